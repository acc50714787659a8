//! The README and docs/ link to each other: every relative link must name a file that exists,
//! and every `#anchor` a heading of that file (GitHub's slugs).
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// GitHub's heading anchor: lower-cased, punctuation other than `-` and `_` dropped, spaces as `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(markdown: &str) -> Vec<String> {
    let mut in_code = false;
    let mut out = Vec::new();
    for line in markdown.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        }
        if !in_code && line.starts_with('#') {
            out.push(slug(line.trim_start_matches('#')));
        }
    }
    out
}

/// `(target, line number)` of every inline link `[text](target)` outside code.
fn links(markdown: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    let mut in_code = false;
    for (n, line) in markdown.lines().enumerate() {
        if line.starts_with("```") {
            in_code = !in_code;
        }
        if in_code || line.starts_with("    ") {
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find("](") {
            let tail = &rest[i + 2..];
            let Some(end) = tail.find(')') else { break };
            out.push((tail[..end].to_string(), n + 1));
            rest = &tail[end..];
        }
    }
    out
}

fn documents() -> Vec<PathBuf> {
    let mut docs = vec![repo().join("README.md")];
    for e in std::fs::read_dir(repo().join("docs")).expect("docs/ exists") {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            docs.push(p);
        }
    }
    docs
}

#[test]
fn relative_links_resolve() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap();
        for (target, line) in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (file, anchor) = match target.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (target.as_str(), None),
            };
            let path = if file.is_empty() {
                doc.clone()
            } else {
                doc.parent().unwrap().join(file)
            };
            checked += 1;
            let at = format!("{}:{line}: {target}", doc.display());
            if !path.exists() {
                broken.push(format!("{at} (no such file)"));
            } else if let Some(a) = anchor {
                let heads = anchors(&std::fs::read_to_string(&path).unwrap_or_default());
                if !heads.iter().any(|h| h == a) {
                    broken.push(format!("{at} (no such heading)"));
                }
            }
        }
    }
    assert!(
        checked > 10,
        "found only {checked} links: is the scan broken?"
    );
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn slugs_follow_github() {
    assert_eq!(
        slug(" `safegeo train --out DIR`"),
        "safegeo-train---out-dir"
    );
    assert_eq!(slug(" 6. Training"), "6-training");
    assert_eq!(
        links("see [a](docs/a.md#x) and [b](b.md)"),
        vec![("docs/a.md#x".into(), 1), ("b.md".into(), 1)]
    );
}

#[test]
fn readme_stays_short() {
    let lines = std::fs::read_to_string(repo().join("README.md"))
        .unwrap()
        .lines()
        .count();
    assert!(
        lines <= 300,
        "README.md has {lines} lines; move detail into docs/"
    );
}
