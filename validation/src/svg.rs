//! `cdf.svg`: the predicted and measured distributions of TTFT and E2E latency as empirical
//! CDFs, side by side, predicted dashed and measured solid. Written by hand: two step lines
//! per panel need no plotting library.

use std::fmt::Write;

/// One panel's data: latencies in ms, any order.
pub struct Panel<'a> {
    pub title: &'a str,
    pub predicted_ms: &'a [f64],
    pub measured_ms: &'a [f64],
}

const PANEL_WIDTH: f64 = 460.0;
const PANEL_HEIGHT: f64 = 320.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 60.0;
const BOTTOM: f64 = 50.0;
const MEASURED_COLOUR: &str = "#1f77b4";
const PREDICTED_COLOUR: &str = "#d62728";

/// The SVG document for `panels`, titled `title`.
pub fn cdf_svg(title: &str, panels: &[Panel]) -> String {
    let width = panels.len() as f64 * (LEFT + PANEL_WIDTH + RIGHT);
    let height = TOP + PANEL_HEIGHT + BOTTOM;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="{width}" height="{height}" fill="white"/>"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="20" text-anchor="middle" font-size="14">{}</text>"#,
        width / 2.0,
        escape(title)
    );
    legend(&mut svg, width / 2.0 - 130.0, 38.0);
    for (i, panel) in panels.iter().enumerate() {
        let x0 = i as f64 * (LEFT + PANEL_WIDTH + RIGHT) + LEFT;
        draw_panel(&mut svg, panel, x0, TOP);
    }
    svg.push_str("</svg>\n");
    svg
}

fn legend(svg: &mut String, x: f64, y: f64) {
    for (i, (label, colour, dash)) in [
        ("measured", MEASURED_COLOUR, ""),
        ("predicted", PREDICTED_COLOUR, r#" stroke-dasharray="6 4""#),
    ]
    .into_iter()
    .enumerate()
    {
        let x = x + i as f64 * 140.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{x}" y1="{y}" x2="{}" y2="{y}" stroke="{colour}" stroke-width="2"{dash}/>"#,
            x + 30.0
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}">{label}</text>"#,
            x + 36.0,
            y + 4.0
        );
    }
}

fn draw_panel(svg: &mut String, panel: &Panel, x0: f64, y0: f64) {
    let max_ms = panel
        .predicted_ms
        .iter()
        .chain(panel.measured_ms)
        .copied()
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let (x_max, step) = axis_range(max_ms);
    let x_of = |ms: f64| x0 + ms / x_max * PANEL_WIDTH;
    let y_of = |share: f64| y0 + (1.0 - share) * PANEL_HEIGHT;
    let _ = writeln!(
        svg,
        r##"<rect x="{x0}" y="{y0}" width="{PANEL_WIDTH}" height="{PANEL_HEIGHT}" fill="none" stroke="#444"/>"##
    );
    let ticks = (x_max / step).round() as u32;
    for t in 0..=ticks {
        let ms = f64::from(t) * step;
        let x = x_of(ms);
        let _ = writeln!(
            svg,
            r##"<line x1="{x}" y1="{y0}" x2="{x}" y2="{}" stroke="#ddd"/>"##,
            y0 + PANEL_HEIGHT
        );
        let _ = writeln!(
            svg,
            r#"<text x="{x}" y="{}" text-anchor="middle">{}</text>"#,
            y0 + PANEL_HEIGHT + 16.0,
            tick_label(ms)
        );
    }
    for t in 0..=4 {
        let share = f64::from(t) / 4.0;
        let y = y_of(share);
        let _ = writeln!(
            svg,
            r##"<line x1="{x0}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/>"##,
            x0 + PANEL_WIDTH
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="end">{share:.2}</text>"#,
            x0 - 6.0,
            y + 4.0
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">{} (ms)</text>"#,
        x0 + PANEL_WIDTH / 2.0,
        y0 + PANEL_HEIGHT + 36.0,
        escape(panel.title)
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle" transform="rotate(-90 {} {})">share of requests</text>"#,
        x0 - 42.0,
        y0 + PANEL_HEIGHT / 2.0,
        x0 - 42.0,
        y0 + PANEL_HEIGHT / 2.0
    );
    for (values, colour, dash) in [
        (panel.measured_ms, MEASURED_COLOUR, ""),
        (
            panel.predicted_ms,
            PREDICTED_COLOUR,
            r#" stroke-dasharray="6 4""#,
        ),
    ] {
        if let Some(path) = step_path(values, &x_of, &y_of) {
            let _ = writeln!(
                svg,
                r#"<path d="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>"#
            );
        }
    }
}

/// The empirical CDF as a step line: up by 1/n at each value. `None` when empty.
fn step_path(
    values: &[f64],
    x_of: &dyn Fn(f64) -> f64,
    y_of: &dyn Fn(f64) -> f64,
) -> Option<String> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    let first = *sorted.first()?;
    let n = sorted.len() as f64;
    let mut path = format!("M{:.2},{:.2}", x_of(first), y_of(0.0));
    for (i, &v) in sorted.iter().enumerate() {
        let _ = write!(path, " H{:.2} V{:.2}", x_of(v), y_of((i + 1) as f64 / n));
    }
    Some(path)
}

/// The axis end (a multiple of the tick step at or past `max`) and a 1-2-5 tick step giving
/// 4 to 10 ticks.
pub fn axis_range(max: f64) -> (f64, f64) {
    if !(max.is_finite() && max > 0.0) {
        return (1.0, 0.25);
    }
    let raw = max / 6.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * magnitude);
    ((max / step).ceil() * step, step)
}

fn tick_label(ms: f64) -> String {
    if ms == ms.round() {
        format!("{ms:.0}")
    } else {
        let s = format!("{ms:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_end_on_a_round_tick_past_the_data() {
        assert_eq!(axis_range(1014.0), (1200.0, 200.0));
        assert_eq!(axis_range(3573.0), (4000.0, 1000.0));
        assert_eq!(axis_range(42.0), (50.0, 10.0));
        assert_eq!(axis_range(0.0), (1.0, 0.25));
        assert_eq!(axis_range(f64::NAN), (1.0, 0.25));
    }

    #[test]
    fn both_sides_are_drawn_as_steps_predicted_dashed() {
        let svg = cdf_svg(
            "case <x>",
            &[Panel {
                title: "TTFT",
                predicted_ms: &[30.0, 10.0, 20.0],
                measured_ms: &[12.0, 40.0],
            }],
        );
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("case &lt;x&gt;"));
        assert!(svg.contains(">TTFT (ms)</text>"));
        let paths: Vec<&str> = svg.lines().filter(|l| l.starts_with("<path")).collect();
        assert_eq!(paths.len(), 2);
        let (measured, predicted) = (paths[0], paths[1]);
        assert!(!measured.contains("dasharray") && predicted.contains("dasharray"));
        // Three steps for three predictions, from 0 up to 1 (y runs down the page).
        assert_eq!(predicted.matches(" V").count(), 3);
        let ys: Vec<f64> = predicted
            .split(" V")
            .skip(1)
            .map(|s| s.split(['"', ' ']).next().unwrap().parse().unwrap())
            .collect();
        assert!(ys.windows(2).all(|w| w[1] < w[0]), "{ys:?}");
        assert_eq!(*ys.last().unwrap(), TOP);
    }

    #[test]
    fn an_empty_side_draws_no_line() {
        let svg = cdf_svg(
            "t",
            &[Panel {
                title: "E2E latency",
                predicted_ms: &[],
                measured_ms: &[5.0],
            }],
        );
        assert_eq!(svg.lines().filter(|l| l.starts_with("<path")).count(), 1);
    }
}
