//! `REPORT_DIR/index.html`: one self-contained page (inline SVG figures drawn with plotters, no
//! scripts, no network) with the trajectory table and its figures.
use crate::trajectory::{Est, Row, COLUMNS};
use crate::{Error, Result};
use plotters::prelude::*;
use std::collections::BTreeMap;

/// A named series of (x, y) points.
pub struct Series {
    /// Legend label.
    pub label: String,
    /// Points, in x order.
    pub points: Vec<(f64, f64)>,
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn range(values: impl Iterator<Item = f64>, pad_to_unit: bool) -> (f64, f64) {
    let (mut lo, mut hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if pad_to_unit {
        lo = lo.min(0.0);
        hi = hi.max(1.0);
    }
    if hi - lo < 1e-9 {
        hi = lo + 1.0;
    }
    let pad = (hi - lo) * 0.05;
    (lo - pad, hi + pad)
}

/// A line chart with points, as an SVG string. `unit_y` keeps [0, 1] in view (rates).
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    unit_y: bool,
) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (560, 340)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let xs = range(
            series.iter().flat_map(|s| s.points.iter().map(|p| p.0)),
            false,
        );
        let ys = range(
            series.iter().flat_map(|s| s.points.iter().map(|p| p.1)),
            unit_y,
        );
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(xs.0..xs.1, ys.0..ys.1)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(plot_err)?;
        for (i, s) in series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let pts: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|p| p.1.is_finite())
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(plot_err)?
                .label(s.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(plot_err)?;
        }
        if !series.is_empty() {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.3))
                .position(SeriesLabelPosition::UpperRight)
                .draw()
                .map_err(plot_err)?;
        }
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

fn plot_err<E: std::fmt::Debug>(e: E) -> Error {
    Error::Plot(format!("{e:?}"))
}

fn per_recipe(rows: &[Row], what: &str, f: impl Fn(&Row) -> Option<f64>) -> Vec<Series> {
    let mut by: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let base = rows.iter().find(|r| r.anchor.recipe == "base");
    for r in rows.iter().filter(|r| r.anchor.recipe != "base") {
        let pts = by.entry(r.anchor.recipe.clone()).or_default();
        if pts.is_empty() {
            // Every recipe starts from the base model.
            if let Some(v) = base.and_then(&f) {
                pts.push((0.0, v));
            }
        }
        if let Some(v) = f(r) {
            pts.push((r.anchor.step as f64, v));
        }
    }
    if by.is_empty() {
        if let Some(v) = base.and_then(&f) {
            by.insert("base".into(), vec![(0.0, v)]);
        }
    }
    by.into_iter()
        .filter(|(_, p)| !p.is_empty())
        .map(|(recipe, points)| Series {
            label: format!("{recipe}: {what}"),
            points,
        })
        .collect()
}

fn val(e: &Option<Est>) -> Option<f64> {
    e.map(|e| e.value)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Sweep effects read from an anchor's `geometry/sweep.json`, for the sweep figure.
pub struct SweepFigure {
    /// Anchor label.
    pub anchor: String,
    /// `sweep.json` as written by `safegeo sweep`.
    pub sweep: serde_json::Value,
}

fn sweep_chart(s: &SweepFigure) -> Result<Option<String>> {
    let Some(effects) = s.sweep["effects"].as_array() else {
        return Ok(None);
    };
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for e in effects {
        if e["metric"] != "harmful_refusal_rate" {
            continue;
        }
        let (Some(dir), Some(coef), Some(v), Some(c)) = (
            e["direction"].as_str(),
            e["coef"].as_f64(),
            e["value"].as_f64(),
            e["control"].as_f64(),
        ) else {
            continue;
        };
        series
            .entry(format!("{dir} carrier"))
            .or_default()
            .push((coef, v));
        series
            .entry(format!("{dir}: random controls (mean)"))
            .or_default()
            .push((coef, c));
    }
    if series.is_empty() {
        return Ok(None);
    }
    let series: Vec<Series> = series
        .into_iter()
        .map(|(label, mut points)| {
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            Series { label, points }
        })
        .collect();
    line_chart(
        &format!("Sweep at {}: harmful refusal rate vs coefficient", s.anchor),
        "activation-addition coefficient",
        "refusal rate (harmful)",
        &series,
        true,
    )
    .map(Some)
}

/// The whole page.
pub fn page(rows: &[Row], sweeps: &[SweepFigure], notes: &[String]) -> Result<String> {
    let mut figures = Vec::new();
    let mut asr = per_recipe(rows, "ASR fixed-source", |r| val(&r.asr_fixed));
    asr.extend(per_recipe(rows, "ASR adaptive", |r| val(&r.asr_adaptive)));
    asr.extend(per_recipe(rows, "harmful refused", |r| {
        val(&r.harmful_refusal)
    }));
    figures.push((
        "Attack success and refusal per anchor",
        line_chart(
            "Attack success and refusal",
            "training step",
            "rate",
            &asr,
            true,
        )?,
    ));
    let mut over = per_recipe(rows, "JBB benign refused", |r| val(&r.benign_refusal));
    over.extend(per_recipe(rows, "XSTest safe, any refusal", |r| {
        val(&r.xstest_over_refusal)
    }));
    figures.push((
        "Over-refusal per anchor",
        line_chart("Over-refusal", "training step", "rate", &over, true)?,
    ));
    let layer = per_recipe(rows, "carrier layer", |r| r.carrier_layer.map(|l| l as f64));
    figures.push((
        "Carrier layer per anchor (selected under a rule, or the lowest-bypass stand-in; see table)",
        line_chart("Carrier layer", "training step", "layer", &layer, false)?,
    ));
    let mut geo = per_recipe(rows, "H/R coupling |cos|", |r| r.coupling);
    geo.extend(per_recipe(rows, "carrier cos to base", |r| {
        r.carrier_cos_base
    }));
    figures.push((
        "Harmfulness/refusal coupling and carrier similarity to the base",
        line_chart(
            "Coupling and similarity",
            "training step",
            "|cos| / cos",
            &geo,
            true,
        )?,
    ));
    let curves: Vec<Series> = rows
        .iter()
        .filter(|r| !r.bypass_by_layer.is_empty())
        .map(|r| Series {
            label: format!("{} {}", r.anchor.recipe, r.anchor.name),
            points: r
                .bypass_by_layer
                .iter()
                .enumerate()
                .map(|(l, &v)| (l as f64, v))
                .collect(),
        })
        .collect();
    figures.push(("Refusal score by layer: harmful prompts' refusal score after ablating the layer's best candidate (lower = that layer carries refusal)", line_chart("Refusal score under ablation, by layer", "layer", "refusal score (harmful)", &curves, false)?));
    for s in sweeps {
        if let Some(svg) = sweep_chart(s)? {
            figures.push((
                "Causal sweep of the carriers against matched random controls",
                svg,
            ));
        }
    }
    let mut html = String::from(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>safegeo trajectory report</title>\n<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f3f3f3}figure{display:inline-block;margin:0 1em 1em 0;vertical-align:top;max-width:560px}figcaption{font-size:13px;color:#444}.no{color:#b00}</style></head><body>\n<h1>safegeo trajectory report</h1>\n",
    );
    html.push_str("<p>One row per anchor. Rates are shares of prompts (95% intervals in trajectory.json). The carrier layer is the selected carrier's, under the rule in <em>carrier_rule</em>: <em>absolute</em> (KL at most 0.1) or <em>floor-relative</em> (KL within the 95th percentile of ablating random directions); when neither selects one, the run's <em>reference</em> carrier (the one selected at its latest anchor that has one, or named with <code>--reference-carrier</code>), and without one the lowest-bypass candidate (<span class=\"no\">stand-in</span>).</p>\n");
    html.push_str("<div style=\"overflow-x:auto\"><table><tr>");
    for c in COLUMNS {
        html.push_str(&format!("<th>{}</th>", escape(c)));
    }
    html.push_str("</tr>\n");
    for r in rows {
        html.push_str("<tr>");
        for (i, cell) in crate::trajectory::cells(r).iter().enumerate() {
            let class = if COLUMNS[i] == "carrier_rule" && cell == "stand-in" {
                " class=\"no\""
            } else {
                ""
            };
            html.push_str(&format!("<td{class}>{}</td>", escape(cell)));
        }
        html.push_str("</tr>\n");
    }
    html.push_str("</table></div>\n");
    let judges: Vec<String> = rows
        .iter()
        .flat_map(|r| r.judges.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    html.push_str(&format!("<p>Judges: {}. String-match judges count every non-refusal as a success (an upper bound on harmful compliance).</p>\n", escape(&judges.join(", "))));
    for n in notes {
        html.push_str(&format!("<p>{}</p>\n", escape(n)));
    }
    for (caption, svg) in figures {
        html.push_str(&format!(
            "<figure>{svg}<figcaption>{}</figcaption></figure>\n",
            escape(caption)
        ));
    }
    let reasons: Vec<String> = rows
        .iter()
        .filter(|r| !r.selection_note.is_empty())
        .map(|r| {
            format!(
                "<li>{} {}: {}</li>",
                escape(&r.anchor.recipe),
                escape(&r.anchor.name),
                escape(&r.selection_note)
            )
        })
        .collect();
    if !reasons.is_empty() {
        html.push_str(&format!(
            "<h2>Anchors without an admissible carrier</h2><ul>{}</ul>\n",
            reasons.join("\n")
        ));
    }
    html.push_str("</body></html>\n");
    Ok(html)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_svg_and_handle_empty_and_constant_series() {
        let s = line_chart(
            "t",
            "x",
            "y",
            &[Series {
                label: "a<b".into(),
                points: vec![(0.0, 0.5), (1.0, 0.5)],
            }],
            true,
        )
        .unwrap();
        assert!(s.starts_with("<svg") && s.contains("</svg>"));
        assert!(s.contains("a&lt;b"), "labels are escaped");
        let empty = line_chart("t", "x", "y", &[], false).unwrap();
        assert!(empty.contains("</svg>"));
        let nan = line_chart(
            "t",
            "x",
            "y",
            &[Series {
                label: "n".into(),
                points: vec![(0.0, f64::NAN)],
            }],
            false,
        )
        .unwrap();
        assert!(nan.contains("</svg>"));
    }
}
