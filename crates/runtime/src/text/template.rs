//! Chat templates are untrusted input that comes with model files. Rendering is bounded: a fixed
//! instruction budget (a template that loops forever runs out of fuel), a recursion limit, a cap
//! on the rendered size, a memory budget (see `alloc_guard`: string doubling costs little fuel),
//! and no filesystem access (no loader is set).
use serde::Serialize;

/// Instructions a chat template may execute (real templates need a few thousand).
pub const TEMPLATE_FUEL: u64 = 2_000_000;
/// Longest rendered prompt accepted, in bytes.
pub const TEMPLATE_MAX_BYTES: usize = 16 << 20;
/// Memory a rendering may hold at once (enforced where `alloc_guard::Guarded` is installed).
pub const TEMPLATE_MAX_MEMORY: usize = 256 << 20;

/// Render `template` for `messages` (anything serializing to a list of {role, content}).
/// `add_generation_prompt` is true unless the last message is the assistant's.
pub fn render<M: Serialize>(
    template: &str,
    messages: &[M],
    bos_token: &str,
    eos_token: &str,
) -> Result<String, String> {
    crate::text::alloc_guard::bounded(
        TEMPLATE_MAX_MEMORY,
        "rendering the chat template",
        "the model's chat template is broken or hostile: pass --no-template to feed raw text, or use a model whose template renders in bounded memory",
        || render_unbounded(template, messages, bos_token, eos_token),
    )
}

fn render_unbounded<M: Serialize>(
    template: &str,
    messages: &[M],
    bos_token: &str,
    eos_token: &str,
) -> Result<String, String> {
    let mut env = minijinja::Environment::new();
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.set_recursion_limit(64);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_function("strftime_now", |_fmt: String| "26 Jul 2024".to_string());
    env.add_template("chat", template)
        .map_err(|e| format!("{e:#}"))?;
    let tmpl = env.get_template("chat").map_err(|e| e.to_string())?;
    let value = minijinja::Value::from_serialize(messages);
    let last_is_assistant = value
        .try_iter()
        .ok()
        .and_then(|it| it.last())
        .and_then(|m| m.get_attr("role").ok())
        .is_some_and(|r| r.as_str() == Some("assistant"));
    let out = tmpl
        .render(minijinja::context! {
            messages => value,
            add_generation_prompt => !last_is_assistant,
            bos_token => bos_token,
            eos_token => eos_token,
        })
        .map_err(|e| format!("{e:#}"))?;
    if out.len() > TEMPLATE_MAX_BYTES {
        return Err(format!(
            "rendered prompt is {} bytes (limit {TEMPLATE_MAX_BYTES})",
            out.len()
        ));
    }
    Ok(out)
}
