//! Result tables as CSV, written through the `csv` crate so a field that holds a comma, a quote
//! or a line break is quoted as RFC 4180 says.

/// `header` then one record per row, as CSV text.
pub fn csv_text<R, I, F>(header: &[&str], rows: R) -> String
where
    R: IntoIterator<Item = I>,
    I: IntoIterator<Item = F>,
    F: AsRef<[u8]>,
{
    let mut w = csv::Writer::from_writer(Vec::new());
    // Writing into memory cannot fail; a record of another length than the header is a bug.
    w.write_record(header).expect("writing CSV into memory");
    for row in rows {
        w.write_record(row)
            .expect("a CSV row as long as its header");
    }
    let bytes = w.into_inner().expect("flushing CSV into memory");
    String::from_utf8(bytes).expect("CSV of UTF-8 fields is UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_fields_stay_bare_and_awkward_ones_are_quoted() {
        let text = csv_text(
            &["a", "b"],
            [
                vec!["1".to_string(), "x".into()],
                vec!["2".into(), "p, \"q\"".into()],
            ],
        );
        assert_eq!(text, "a,b\n1,x\n2,\"p, \"\"q\"\"\"\n");
        let back: Vec<Vec<String>> = csv::Reader::from_reader(text.as_bytes())
            .records()
            .map(|r| r.unwrap().iter().map(String::from).collect())
            .collect();
        assert_eq!(back[1], ["2", "p, \"q\""]);
    }

    #[test]
    #[should_panic(expected = "as long as its header")]
    fn a_short_row_is_a_bug() {
        csv_text(&["a", "b"], [vec!["1"]]);
    }
}
