//! The ratios of one runtime to the baseline as an SVG bar chart (no plotting dependency:
//! a few rectangles and labels), written next to the table in docs/benchmarks.md.
use super::Row;

/// Bars of `runtime`'s ratio to the first runtime per operation, on a log scale.
pub fn svg(rows: &[Row], runtime: &str, title: &str) -> String {
    let bars: Vec<(&str, f64)> = rows
        .iter()
        .filter(|r| r.runtime == runtime)
        .filter_map(|r| {
            let base = rows.iter().find(|b| b.op == r.op)?;
            Some((r.op, r.ratio_to(base)))
        })
        .collect();
    let (left, width, bar, gap, top) = (300.0, 420.0, 22.0, 8.0, 40.0);
    let height = top + bars.len() as f64 * (bar + gap) + 40.0;
    // log10 scale from 0.5x to 100x
    let (lo, hi) = (0.5f64.log10(), 100f64.log10());
    let x = |ratio: f64| left + (ratio.max(0.5).log10() - lo) / (hi - lo) * width;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <text x=\"10\" y=\"20\" font-size=\"14\">{}</text>\n",
        left + width + 80.0,
        escape(title)
    );
    for (tick, label) in [
        (1.0, "1×"),
        (2.0, "2×"),
        (4.0, "4×"),
        (10.0, "10×"),
        (40.0, "40×"),
    ] {
        out += &format!(
            "<line x1=\"{x}\" y1=\"{top}\" x2=\"{x}\" y2=\"{y2}\" stroke=\"#ccc\"/>\
             <text x=\"{x}\" y=\"{ly}\" text-anchor=\"middle\">{label}</text>\n",
            x = x(tick),
            y2 = height - 30.0,
            ly = height - 15.0
        );
    }
    for (i, (op, ratio)) in bars.iter().enumerate() {
        let y = top + i as f64 * (bar + gap);
        let color = if *ratio <= 2.0 {
            "#4a8"
        } else if *ratio <= 10.0 {
            "#da3"
        } else {
            "#c55"
        };
        out += &format!(
            "<text x=\"{tx}\" y=\"{ty}\" text-anchor=\"end\">{op}</text>\
             <rect x=\"{left}\" y=\"{y}\" width=\"{w}\" height=\"{bar}\" fill=\"{color}\"/>\
             <text x=\"{vx}\" y=\"{ty}\">{ratio:.1}×</text>\n",
            tx = left - 6.0,
            ty = y + bar * 0.7,
            w = (x(*ratio) - x(0.5)).max(1.0),
            vx = x(*ratio) + 4.0,
            op = escape(op),
        );
    }
    out + "</svg>\n"
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
