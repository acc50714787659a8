//! The guarded allocator's bookkeeping (the exit on an exceeded budget is tested through the
//! binary, in the CLI tests: it ends the process).
use safegeo_runtime::alloc_guard::{bounded, used, Guarded};

#[global_allocator]
static ALLOC: Guarded = Guarded;

#[test]
fn budgets_count_live_bytes_of_this_thread_only() {
    assert_eq!(used(), 0, "no budget outside `bounded`");
    bounded(64 << 20, "test", "none", || {
        let before = used();
        let big = vec![7u8; 8 << 20];
        assert!(used() >= before + (8 << 20), "{} after 8 MiB", used());
        // Another thread's allocations are not charged here.
        let other = std::thread::spawn(|| vec![1u8; 16 << 20].len())
            .join()
            .unwrap();
        assert_eq!(other, 16 << 20);
        assert!(used() < before + (9 << 20));
        drop(big);
        assert!(
            used() < before + (1 << 20),
            "freed bytes come back: {}",
            used()
        );
        // Nested budgets replace the outer one and restore it.
        let outer = used();
        bounded(1 << 20, "inner", "none", || assert!(used() < 1 << 10));
        assert_eq!(used(), outer);
    });
    assert_eq!(used(), 0);
    // A real template renders well inside the budget.
    let t = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}";
    let msgs = [serde_json::json!({"role": "user", "content": "hi"})];
    assert_eq!(
        safegeo_runtime::template::render(t, &msgs, "", "").unwrap(),
        "<|user|>hi"
    );
}
