//! Every long command killed with SIGKILL at a random point resumes to the uninterrupted result.
use crate::common::*;

#[test]
fn deception_and_trajectory_resume_after_kill_9_to_the_uninterrupted_result() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let model = h.join("tiny");
    write_tiny_hf(Arch::Llama, 6, &model).unwrap();
    let m = model.to_str().unwrap();
    let scen = tiny_scenarios(h);
    let deception = |out: &Path| -> Vec<String> {
        [
            "deception",
            "-m",
            m,
            "--scenarios",
            scen.to_str().unwrap(),
            "--runs",
            "12",
            "--max-new-tokens",
            "24",
            "--batch-size",
            "2",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let sorted_records = |out: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_to_string(out.join("records.jsonl"))
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        v.sort();
        v
    };
    let full = h.join("dec-full");
    let args = deception(&full);
    let out = safegeo(&args.iter().map(String::as_str).collect::<Vec<_>>(), h);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cut = h.join("dec-cut");
    let args = deception(&cut);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let records_file = cut.join("records.jsonl");
    kill_when(&argv, h, || {
        std::fs::read_to_string(&records_file).map_or(0, |s| s.lines().count()) >= 5
    });
    let partial = std::fs::read_to_string(&records_file).map_or(0, |s| s.lines().count());
    assert!(partial < 24, "the run was not interrupted");
    assert!(safegeo(&argv, h).status.success());
    assert_eq!(
        sorted_records(&cut),
        sorted_records(&full),
        "killed after {partial} records"
    );
    assert_eq!(
        std::fs::read_to_string(cut.join("summary.csv")).unwrap(),
        std::fs::read_to_string(full.join("summary.csv")).unwrap()
    );

    // Trajectory: kill while the second anchor is being measured, resume, same table.
    for (i, seed) in [7u64, 8].iter().enumerate() {
        write_tiny_hf(
            Arch::Llama,
            *seed,
            &h.join("run").join(format!("ckpt-{:06}", i + 1)),
        )
        .unwrap();
    }
    let (harm, harmless) = (
        prompt_file(h, "harm.jsonl", 1, "harmful", 10),
        prompt_file(h, "harmless.jsonl", 20, "benign", 10),
    );
    let sets = format!("{harm},{harmless}");
    let a1 = h.join("run/ckpt-000001").to_str().unwrap().to_string();
    let a2 = h.join("run/ckpt-000002").to_str().unwrap().to_string();
    let trajectory = |out: &Path| -> Vec<String> {
        [
            "trajectory",
            "--anchors",
            &a1,
            &a2,
            "--base",
            m,
            "--suite",
            &harm,
            "--limit",
            "6",
            "--max-new-tokens",
            "16",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(tiny_geometry_args(&sets))
        .collect()
    };
    let full = h.join("traj-full");
    let args = trajectory(&full);
    let out = safegeo(&args.iter().map(String::as_str).collect::<Vec<_>>(), h);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cut = h.join("traj-cut");
    let args = trajectory(&cut);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let second = cut.join("anchors/run__ckpt-000001/eval/records.jsonl");
    kill_when(&argv, h, || second.is_file());
    assert!(
        !cut.join("trajectory.csv").exists(),
        "the run was not interrupted"
    );
    let out = safegeo(&argv, h);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(cut.join("trajectory.csv")).unwrap(),
        std::fs::read_to_string(full.join("trajectory.csv")).unwrap()
    );
}

#[test]
fn carriers_select_sweep_attack_and_train_resume_after_kill_9_to_the_uninterrupted_result() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let model = h.join("tiny");
    write_tiny_hf(Arch::Llama, 12, &model).unwrap();
    let m = model.to_str().unwrap().to_string();
    let (harm, harmless) = (
        prompt_file(h, "harm.jsonl", 1, "harmful", 24),
        prompt_file(h, "harmless.jsonl", 30, "benign", 24),
    );
    let sets = format!("{harm},{harmless}");
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<String>>();
    // select and sweep run in a copy of the uninterrupted carriers folder.
    let copy_carriers = |out: &Path| {
        std::fs::create_dir_all(out).unwrap();
        for f in ["carriers.safetensors", "carriers.json"] {
            std::fs::copy(h.join("carriers-full").join(f), out.join(f)).unwrap();
        }
    };
    let behaviors = h.join("behaviors.jsonl");
    std::fs::write(
        &behaviors,
        (0..3)
            .map(|i| {
                format!(
                    "{{\"id\": \"b{i}\", \"prompt\": \"w{} w{} w{}\", \"target\": \"w{} w{}\"}}\n",
                    3 + i,
                    5 + i,
                    7 + i,
                    11 + i,
                    13 + i
                )
            })
            .collect::<String>(),
    )
    .unwrap();
    /// When to kill: at a share of the uninterrupted run's wall time, once a journal holds more
    /// lines than the point, or once a file holds as many lines as the point and `state/` exists.
    enum Kill {
        AtPercentOfTime,
        JournalPast(&'static str),
        CasesAndState(&'static str),
    }
    /// One row: the command (its output folder last), the kill point's range, what the resumed
    /// run's log says, and the files compared: byte for byte, and JSON but for its wall time.
    type Args<'a> = Box<dyn Fn(&Path) -> Vec<String> + 'a>;
    struct Case<'a> {
        name: &'static str,
        args: Args<'a>,
        kill: Kill,
        point: (usize, usize),
        log_says: Option<&'static str>,
        files: &'static [&'static str],
        json_but_seconds: &'static [&'static str],
    }
    let cases: Vec<Case> = vec![
        // carriers: one pass, written atomically; a kill anywhere leaves nothing torn.
        Case {
            name: "carriers",
            args: Box::new(|out| {
                strings(&[
                    "carriers",
                    "-m",
                    &m,
                    "--harmful",
                    &harm,
                    "--harmless",
                    &harmless,
                    "--n",
                    "24",
                    "--bootstrap",
                    "4000",
                    "--out",
                    out.to_str().unwrap(),
                ])
            }),
            kill: Kill::AtPercentOfTime,
            point: (5, 60),
            log_says: None,
            files: &["carriers.safetensors", "carriers.json", "geometry.json"],
            json_but_seconds: &[],
        },
        // select and sweep resume from their journals; both start from the same carriers.
        Case {
            name: "select",
            args: Box::new(|out| {
                copy_carriers(out);
                strings(&[
                    "select",
                    out.to_str().unwrap(),
                    "--val",
                    &sets,
                    "--n-val",
                    "12",
                    "--screen",
                    "4",
                    "--finalists",
                    "4",
                    "--kl-max",
                    "50",
                ])
            }),
            kill: Kill::JournalPast("select.journal.jsonl"),
            point: (2, 6),
            log_says: Some("measurements already made"),
            files: &["selection.csv"],
            json_but_seconds: &["selection.json"],
        },
        Case {
            name: "sweep",
            args: Box::new(|out| {
                copy_carriers(out);
                strings(&[
                    "sweep",
                    out.to_str().unwrap(),
                    "--carrier",
                    "1:0",
                    "--val",
                    &sets,
                    "--n",
                    "8",
                    "--coefs",
                    "-1,0,1",
                    "--controls",
                    "8",
                    "--continuation-tokens",
                    "4",
                ])
            }),
            kill: Kill::JournalPast("sweep.journal.jsonl"),
            point: (2, 12),
            log_says: Some("conditions already measured"),
            files: &["sweep.csv"],
            json_but_seconds: &["sweep.json"],
        },
        // attack: GCG writes its state after every step and a test case per behaviour.
        Case {
            name: "gcg",
            args: Box::new(|out| {
                strings(&[
                    "attack",
                    "gcg",
                    "-m",
                    &m,
                    "--behaviors",
                    behaviors.to_str().unwrap(),
                    "--steps",
                    "12",
                    "--search-width",
                    "32",
                    "--topk",
                    "16",
                    "--optim-str-init",
                    "w1 w1 w1 w1",
                    "--out",
                    out.to_str().unwrap(),
                ])
            }),
            kill: Kill::CasesAndState("test_cases.jsonl"),
            point: (0, 2),
            log_says: None,
            files: &["test_cases.jsonl"],
            json_but_seconds: &[],
        },
    ];
    for case in &cases {
        let point = random_point(case.point.0, case.point.1);
        let (full, cut, log) =
            full_and_resumed(
                h,
                case.name,
                &case.args,
                &|out, took, elapsed| match case.kill {
                    Kill::AtPercentOfTime => elapsed >= took * point as u32 / 100,
                    Kill::JournalPast(journal) => lines_in(&out.join(journal)) > point,
                    Kill::CasesAndState(file) => {
                        lines_in(&out.join(file)) >= point
                            && std::fs::read_dir(out.join("state")).is_ok_and(|d| d.count() > 0)
                    }
                },
            );
        let what = format!("{} killed at point {point}", case.name);
        if let Some(words) = case.log_says {
            assert!(log.contains(words), "{what}: {log}");
        }
        for f in case.files {
            same_file(&full.join(f), &cut.join(f), &what);
        }
        for f in case.json_but_seconds {
            assert_eq!(
                json_without_seconds(&full.join(f)),
                json_without_seconds(&cut.join(f)),
                "{what}: {f}"
            );
        }
    }

    // train: exact resume from the last saved state; the log keeps exactly the steps before it.
    // Training needs a template that renders the prompt as a prefix of prompt + reply.
    let config = model.join("tokenizer_config.json");
    let mut tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    tc["chat_template"] = "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }} w2 {% else %}{{ m['content'] }} w0 {% endif %}{% endfor %}".into();
    std::fs::write(&config, tc.to_string()).unwrap();
    // The recipe's opening bias (written into the anchors after training) reads the reply
    // opening on the validation splits of the data directory, harmful and harmless.
    let data = h.join("data");
    std::fs::create_dir_all(data.join("refusal_splits")).unwrap();
    std::fs::write(
        data.join("refusal_splits/harmful_val.json"),
        r#"[{"instruction": "w1 w4 w5", "category": "c"}, {"instruction": "w7 w2", "category": "c"}]"#,
    )
    .unwrap();
    std::fs::write(
        data.join("refusal_splits/harmless_val.json"),
        r#"[{"instruction": "w3 w6", "category": null}, {"instruction": "w8 w1 w9", "category": null}]"#,
    )
    .unwrap();
    // A short sft run on the tiny model; `rest` picks its length, its opening bias and its
    // soup (one run unless `rest` says otherwise).
    let tiny_sft = |out: &Path, rest: &[&str]| {
        let mut args = strings(&[
            "train",
            "-m",
            &m,
            "--recipe",
            "sft",
            "--batch-size",
            "2",
            "--harmful",
            &harm,
            "--harmless",
            &harmless,
            "--n-harmless",
            "8",
            "--n-hard-negatives",
            "0",
            "--utility-tokens",
            "6",
            "--data-dir",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        if !rest.contains(&"--soup") {
            args.extend(strings(&["--soup", "1"]));
        }
        args.extend(strings(rest));
        args
    };
    let point = random_point(2, 9);
    let (full, cut, _) = full_and_resumed(
        h,
        "train",
        &|out| {
            tiny_sft(
                out,
                &[
                    "--steps",
                    "12",
                    "--save-at",
                    "0,6,12",
                    "--warmup",
                    "2",
                    "--opening-bias",
                    "-1.5",
                ],
            )
        },
        &|out, _, _| lines_in(&out.join("train_log.jsonl")) > point,
    );
    let losses = |dir: &Path| -> Vec<(u64, String)> {
        std::fs::read_to_string(dir.join("train_log.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["step"].as_u64().unwrap(),
                    format!("{} {} {}", v["loss"], v["grad_norm"], v["parts"]),
                )
            })
            .collect()
    };
    assert_eq!(
        losses(&full),
        losses(&cut),
        "train killed after step {point}"
    );
    same_file(
        &full.join("ckpt-000012/model.safetensors"),
        &cut.join("ckpt-000012/model.safetensors"),
        &format!("train killed after step {point}"),
    );
    // Anchors after step 0 carry the opening bias in an untied head, recorded beside them;
    // anchor 0 is the starting model as it is.
    let json = |p: std::path::PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    for step in ["000006", "000012"] {
        let ck = full.join(format!("ckpt-{step}"));
        let cal = json(ck.join("calibration.json"));
        assert_eq!(cal["bias_logits"].as_f64(), Some(-1.5), "{cal}");
        assert_eq!(cal["probes"][0]["prompts"].as_u64(), Some(2), "{cal}");
        assert_eq!(
            json(ck.join("checkpoint.json"))["opening_bias"].as_f64(),
            Some(-1.5)
        );
        assert_eq!(json(ck.join("config.json"))["tie_word_embeddings"], false);
    }
    assert!(!full.join("ckpt-000000/calibration.json").exists());
    assert!(json(full.join("ckpt-000000/config.json"))["tie_word_embeddings"] == true);

    // --opening-bias-target sets each anchor's bias by bisection on harmful-val instead; an
    // anchor that falls short of the share as trained (this tiny model refuses nothing) stays
    // unbiased, and the run says so.
    let target = h.join("train-target");
    let args = tiny_sft(
        &target,
        &[
            "--steps",
            "2",
            "--save-at",
            "2",
            "--warmup",
            "1",
            "--opening-bias-target",
            "0.5",
        ],
    );
    let o = safegeo(&args.iter().map(String::as_str).collect::<Vec<_>>(), h);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("short of the opening-bias target"),
        "{stderr}"
    );
    // Off a terminal, progress is a line per tenth with its ETA, the step's loss and tokens/s.
    assert!(
        stderr.contains("2/2 steps (")
            && stderr.contains(", eta 0s) loss ")
            && stderr.contains(" tok/s"),
        "{stderr}"
    );
    let ck = target.join("ckpt-000002");
    let cal = json(ck.join("calibration.json"));
    assert_eq!(cal["config"]["target_refusal"].as_f64(), Some(0.5), "{cal}");
    assert_eq!(cal["reached"], false, "{cal}");
    assert_eq!(
        json(ck.join("checkpoint.json"))["opening_bias"].as_f64(),
        Some(0.0)
    );

    // --soup 2 trains seeds 0 and 1 as members and writes each anchor as their average, then
    // biases it; a re-run finds everything done and changes nothing.
    let soup = h.join("train-soup");
    let options = "--steps 2 --save-at 0,2 --warmup 1 --soup 2 --opening-bias -1.5";
    let args = tiny_sft(&soup, &options.split(' ').collect::<Vec<_>>());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = safegeo(&args, h);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let load = |p: std::path::PathBuf| {
        candle_core::safetensors::load(p, &candle_core::Device::Cpu).unwrap()
    };
    let members: Vec<_> = ["seed-0", "seed-1"]
        .iter()
        .map(|s| soup.join("members").join(s))
        .collect();
    for m in &members {
        assert_eq!(lines_in(&m.join("train_log.jsonl")), 2, "{}", m.display());
    }
    let (a, b) = (
        load(members[0].join("ckpt-000002/model.safetensors")),
        load(members[1].join("ckpt-000002/model.safetensors")),
    );
    let avg = load(soup.join("ckpt-000002/model.safetensors"));
    let v = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut differ = 0;
    for (name, s) in &avg {
        if name == "lm_head.weight" {
            continue; // the soup's opening bias is in it
        }
        let (va, vb, vs) = (v(&a[name]), v(&b[name]), v(s));
        differ += usize::from(va != vb);
        for ((x, y), s) in va.iter().zip(&vb).zip(&vs) {
            assert!((s - (x + y) / 2.0).abs() < 1e-6, "{name}: {s} vs {x}, {y}");
        }
    }
    assert!(differ > 0, "the two seeds trained alike");
    let ck = json(soup.join("ckpt-000002/checkpoint.json"));
    assert_eq!(ck["soup"].as_array().map(Vec::len), Some(2), "{ck}");
    assert_eq!(ck["opening_bias"].as_f64(), Some(-1.5), "{ck}");
    assert!(soup.join("ckpt-000000/model.safetensors").exists());
    let before = std::fs::read(soup.join("ckpt-000002/model.safetensors")).unwrap();
    let o = safegeo(&args, h);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(soup.join("ckpt-000002/model.safetensors")).unwrap(),
        before
    );
    // The soup's folder remembers its size: another --soup into it is refused.
    let mut other = args.clone();
    let k = other.iter().position(|&x| x == "--soup").unwrap();
    other[k + 1] = "3";
    fails_with(&safegeo(&other, h), 1, "different settings");
}
