//! The same seed gives bit-identical outputs across runs and thread counts.
use crate::common::*;

#[test]
fn same_seed_gives_bit_identical_outputs_across_runs_and_thread_counts() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let model = h.join("tiny");
    write_tiny_hf(Arch::Llama, 9, &model).unwrap();
    let m = model.to_str().unwrap();
    let input = h.join("in.jsonl");
    let lines: Vec<String> = (0..6)
        .map(|i| format!("{{\"chat\": \"w{} w{} w{}\"}}", i + 1, i + 3, 2 * i + 5))
        .collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let (harm, harmless) = (
        prompt_file(h, "harm.jsonl", 1, "harmful", 10),
        prompt_file(h, "harmless.jsonl", 20, "benign", 10),
    );
    // Sampled generation and the carriers (f64 sums over prompts), under 1 and 2 threads, twice.
    let run = |tag: &str, threads: &str| -> (Vec<u8>, Vec<u8>) {
        let gen_out = h.join(format!("gen-{tag}.jsonl"));
        let geo = h.join(format!("geo-{tag}"));
        for args in [
            vec![
                "generate",
                "-m",
                m,
                "--input",
                input.to_str().unwrap(),
                "--output",
                gen_out.to_str().unwrap(),
                "--max-new-tokens",
                "12",
                "--temperature",
                "0.9",
                "--seed",
                "7",
                "--batch-size",
                "4",
            ],
            vec![
                "carriers",
                "-m",
                m,
                "--harmful",
                &harm,
                "--harmless",
                &harmless,
                "--n",
                "10",
                "--bootstrap",
                "3",
                "--out",
                geo.to_str().unwrap(),
            ],
        ] {
            let out = Command::new(env!("CARGO_BIN_EXE_safegeo"))
                .args(&args)
                .env("SAFEGEO_HOME", h)
                .env("RAYON_NUM_THREADS", threads)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        (
            std::fs::read(&gen_out).unwrap(),
            std::fs::read(geo.join("carriers.safetensors")).unwrap(),
        )
    };
    let one = run("a", "1");
    assert_eq!(one, run("b", "1"), "two runs with one thread differ");
    assert_eq!(one, run("c", "2"), "one vs two threads differ");
}
