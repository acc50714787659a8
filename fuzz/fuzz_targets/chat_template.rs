//! The chat-template renderer (`crates/runtime/src/text/template.rs`) on arbitrary templates and
//! messages: bounded work (fuel), bounded recursion and output, no panic. The memory budget
//! (`alloc_guard`) is not installed here (its exit would read as a crash); libFuzzer's
//! `-rss_limit_mb`/`-malloc_limit_mb` stand in for it.
#![no_main]
use libfuzzer_sys::fuzz_target;

use safegeo_runtime::template;

#[derive(serde::Serialize)]
struct Message<'a> {
    role: &'a str,
    content: &'a str,
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The first line is the message content, the rest the template.
    let (content, template) = text.split_once('\n').unwrap_or(("hi", text));
    let messages = [
        Message { role: "system", content: "s" },
        Message { role: "user", content },
    ];
    let _ = template::render(template, &messages, "<s>", "</s>");
});
