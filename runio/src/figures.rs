//! Figures a person can read, drawn with `plotters` into RGB rasters (PNG files next to the
//! tables, and TensorBoard images through [`crate::tensorboard::SummaryWriter::add_image_rgb`]):
//!
//! - [`rank_map`]: ranks of every site in every round, with the sites (layer · projection) and
//!   rounds on labelled axes, a legend of the rank levels, and skipped and lost rounds marked;
//! - [`loss_curves`]: validation loss against step per scheduler, the mean over seeds with a
//!   band from the lowest to the highest seed;
//! - [`spend`]: the resource sent, cumulated over rounds, per scheduler against the cumulated
//!   budget.
//!
//! Text is set in DejaVu Sans, embedded (`assets/`, Bitstream Vera licence), so the pictures
//! need no system fonts and look the same on every machine.

use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::tensorboard::RgbImage;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Errors drawing a figure (a font that failed to register, or a backend error).
#[derive(Debug, thiserror::Error)]
#[error("figure `{what}`: {why}")]
pub struct FigureError {
    /// Which figure.
    pub what: String,
    /// What went wrong.
    pub why: String,
}

fn fonts(what: &str) -> Result<(), FigureError> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
            .map_err(|_| "the embedded font".to_string())
    })
    .clone()
    .map_err(|why| FigureError { what: what.into(), why })
}

fn fail(what: &str) -> impl Fn(String) -> FigureError + '_ {
    move |why| FigureError { what: what.into(), why }
}

/// One round of a [`RankMap`].
#[derive(Debug, Clone, PartialEq)]
pub struct RoundRanks {
    /// Rank of every site in this round (the adapters as trained in it).
    pub ranks: Vec<f64>,
    /// The scheduler skipped the round (nothing trained or sent).
    pub skipped: bool,
    /// The round was lost to the resource (its training rolled back).
    pub lost: bool,
}

/// Sites × rounds of ranks, for [`rank_map`].
#[derive(Debug, Clone, PartialEq)]
pub struct RankMap {
    /// Title above the picture.
    pub title: String,
    /// One label per site, top to bottom (e.g. `L3 q_proj`).
    pub sites: Vec<String>,
    /// The rounds, left to right.
    pub rounds: Vec<RoundRanks>,
}

/// Site label `L<layer> <projection>`.
pub fn site_label(layer: usize, projection: &str) -> String {
    format!("L{layer} {projection}")
}

/// A perceptually ordered colour for `t` in [0, 1] (viridis, piecewise linear).
fn viridis(t: f64) -> RGBColor {
    const STOPS: [[f64; 3]; 5] =
        [[68.0, 1.0, 84.0], [59.0, 82.0, 139.0], [33.0, 145.0, 140.0], [94.0, 201.0, 98.0], [253.0, 231.0, 37.0]];
    let x = t.clamp(0.0, 1.0) * (STOPS.len() - 1) as f64;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    let f = x - i as f64;
    let c = |k: usize| (STOPS[i][k] + f * (STOPS[i + 1][k] - STOPS[i][k])).round() as u8;
    RGBColor(c(0), c(1), c(2))
}

fn to_image(w: u32, h: u32, draw: impl FnOnce(&mut [u8]) -> Result<(), String>) -> Result<RgbImage, String> {
    let mut rgb = vec![255u8; (w * h * 3) as usize];
    draw(&mut rgb)?;
    Ok(RgbImage { width: w, height: h, rgb })
}

/// The ranks of every site in every round as coloured cells: one colour per distinct rank
/// (legend on the right, in rank order), sites labelled down the left, rounds along the bottom.
/// A skipped round is hatched grey and marked `skip` above its column; a lost round is outlined
/// in red and marked `lost`.
pub fn rank_map(m: &RankMap) -> Result<RgbImage, FigureError> {
    let what = "rank map";
    fonts(what)?;
    let n_sites = m.sites.len().max(1);
    let n_rounds = m.rounds.len().max(1);
    let mut levels: Vec<f64> = m.rounds.iter().flat_map(|r| r.ranks.iter().copied()).collect();
    levels.sort_by(f64::total_cmp);
    levels.dedup();
    let colour = |v: f64| -> RGBColor {
        let i = levels.iter().position(|&l| l == v).unwrap_or(0);
        viridis(if levels.len() > 1 { i as f64 / (levels.len() - 1) as f64 } else { 0.5 })
    };
    let cell_h = 14u32;
    let cell_w = (760 / n_rounds as u32).clamp(6, 40);
    let (left, right, top, bottom) = (120u32, 110u32, 70u32, 50u32);
    let w = left + cell_w * n_rounds as u32 + right;
    let h = top + cell_h * n_sites as u32 + bottom;
    to_image(w, h, |buf| {
        let root = BitMapBackend::with_buffer(buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (plot, legend) = root.split_horizontally(w - right + 10);
        // The title is set above the row of skip / lost marks.
        plot.draw(&Text::new(m.title.clone(), (left as i32, 8), ("sans-serif", 16))).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&plot)
            .margin_top(44)
            .x_label_area_size(bottom - 10)
            .y_label_area_size(left - 10)
            .build_cartesian_2d(0f64..n_rounds as f64, n_sites as f64..0f64)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("round")
            .y_desc("site (layer · projection)")
            .x_labels(0)
            .y_labels(0)
            .label_style(("sans-serif", 11))
            .draw()
            .map_err(|e| e.to_string())?;
        // Every site and (up to 25) round labelled at the centre of its row / column.
        let right_mid = TextStyle::from(("sans-serif", 11).into_font()).pos(Pos::new(HPos::Right, VPos::Center));
        for (l, label) in m.sites.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(0.0, l as f64 + 0.5));
            plot.draw(&Text::new(label.clone(), (x - 6, y), right_mid.clone())).map_err(|e| e.to_string())?;
        }
        let every = n_rounds.div_ceil(25);
        let centre_top = TextStyle::from(("sans-serif", 11).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
        for t in (0..n_rounds).step_by(every) {
            let (x, y) = chart.backend_coord(&(t as f64 + 0.5, n_sites as f64));
            plot.draw(&Text::new(format!("{t}"), (x, y + 6), centre_top.clone())).map_err(|e| e.to_string())?;
        }
        for (t, round) in m.rounds.iter().enumerate() {
            for (l, &v) in round.ranks.iter().enumerate() {
                let (x0, y0) = (t as f64, l as f64);
                chart
                    .draw_series(std::iter::once(Rectangle::new([(x0, y0), (x0 + 1.0, y0 + 1.0)], colour(v).filled())))
                    .map_err(|e| e.to_string())?;
                if round.skipped {
                    // Hatching: a grey diagonal across each cell of a skipped round.
                    chart
                        .draw_series(std::iter::once(PathElement::new(
                            vec![(x0, y0 + 1.0), (x0 + 1.0, y0)],
                            RGBColor(200, 200, 200).stroke_width(1),
                        )))
                        .map_err(|e| e.to_string())?;
                }
            }
            let mark = if round.lost {
                Some(("lost", RED))
            } else if round.skipped {
                Some(("skip", RGBColor(90, 90, 90)))
            } else {
                None
            };
            if let Some((text, c)) = mark {
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(t as f64, 0.0), (t as f64 + 1.0, n_sites as f64)],
                        c.stroke_width(2),
                    )))
                    .map_err(|e| e.to_string())?;
                let (px, py) = chart.backend_coord(&(t as f64 + 0.5, 0.0));
                let style =
                    TextStyle::from(("sans-serif", 11).into_font()).color(&c).pos(Pos::new(HPos::Center, VPos::Bottom));
                plot.draw(&Text::new(text, (px, py - 3), style)).map_err(|e| e.to_string())?;
            }
        }
        legend.draw(&Text::new("rank", (10, top as i32 - 20), ("sans-serif", 13))).map_err(|e| e.to_string())?;
        for (i, &v) in levels.iter().rev().enumerate() {
            let y = top as i32 + i as i32 * 18;
            legend.draw(&Rectangle::new([(10, y), (26, y + 14)], colour(v).filled())).map_err(|e| e.to_string())?;
            legend.draw(&Text::new(format!("{v}"), (32, y + 1), ("sans-serif", 12))).map_err(|e| e.to_string())?;
        }
        root.present().map_err(|e| e.to_string())
    })
    .map_err(fail(what))
}

/// One scheduler's validation curve over seeds, for [`loss_curves`].
#[derive(Debug, Clone, PartialEq)]
pub struct LossSeries {
    /// Legend label.
    pub label: String,
    /// Steps of the evaluations.
    pub steps: Vec<f64>,
    /// Per seed, the loss at each of `steps`.
    pub seeds: Vec<Vec<f64>>,
}

fn palette(i: usize) -> RGBColor {
    const P: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    P[i % P.len()]
}

/// Validation loss against step: per series the mean over seeds (a line) and the band from the
/// lowest to the highest seed.
pub fn loss_curves(title: &str, series: &[LossSeries]) -> Result<RgbImage, FigureError> {
    let what = "loss curves";
    fonts(what)?;
    let all = series.iter().flat_map(|s| s.seeds.iter().flatten().copied()).filter(|v| v.is_finite());
    let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = if lo.is_finite() && hi > lo { (lo, hi) } else { (0.0, 1.0) };
    let pad = (hi - lo) * 0.05;
    let x_max = series.iter().flat_map(|s| s.steps.iter().copied()).fold(1.0, f64::max);
    let (w, h) = (900u32, 520u32);
    to_image(w, h, |buf| {
        let root = BitMapBackend::with_buffer(buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..x_max, (lo - pad)..(hi + pad))
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_label_formatter(&|x| format!("{x:.0}"))
            .x_desc("optimizer step")
            .y_desc("validation loss")
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, s) in series.iter().enumerate() {
            let c = palette(i);
            let at = |k: usize, f: fn(f64, f64) -> f64, init: f64| {
                s.seeds.iter().filter_map(|v| v.get(k)).fold(init, |a, &b| f(a, b))
            };
            let n = s.steps.len();
            let upper: Vec<(f64, f64)> = (0..n).map(|k| (s.steps[k], at(k, f64::max, f64::NEG_INFINITY))).collect();
            let lower: Vec<(f64, f64)> = (0..n).map(|k| (s.steps[k], at(k, f64::min, f64::INFINITY))).collect();
            let mean: Vec<(f64, f64)> = (0..n)
                .map(|k| {
                    let v: Vec<f64> = s.seeds.iter().filter_map(|x| x.get(k).copied()).collect();
                    (s.steps[k], v.iter().sum::<f64>() / v.len().max(1) as f64)
                })
                .collect();
            if s.seeds.len() > 1 {
                let band: Vec<(f64, f64)> = upper.iter().copied().chain(lower.iter().rev().copied()).collect();
                chart
                    .draw_series(std::iter::once(Polygon::new(band, c.mix(0.18).filled())))
                    .map_err(|e| e.to_string())?;
            }
            chart
                .draw_series(LineSeries::new(mean, c.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(format!("{} ({} seeds)", s.label, s.seeds.len()))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())
    })
    .map_err(fail(what))
}

/// The resource sent, cumulated over rounds, per series (`(label, cost per round)`) against the
/// cumulated budget (`budget` per round; the budgets of the first series' run).
pub fn spend(title: &str, unit: &str, series: &[(String, Vec<f64>)], budget: &[f64]) -> Result<RgbImage, FigureError> {
    let what = "spend";
    fonts(what)?;
    let cum = |v: &[f64]| -> Vec<f64> {
        v.iter()
            .scan(0.0, |s, x| {
                *s += x;
                Some(*s)
            })
            .collect()
    };
    let b = cum(budget);
    let y_max = series.iter().flat_map(|(_, v)| cum(v)).chain(b.iter().copied()).fold(1.0, f64::max) * 1.05;
    let rounds = budget.len().max(series.iter().map(|(_, v)| v.len()).max().unwrap_or(1)) as f64;
    let (w, h) = (900u32, 480u32);
    to_image(w, h, |buf| {
        let root = BitMapBackend::with_buffer(buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        // A logarithmic axis: the budget and what is sent can differ by orders of magnitude.
        let y_min =
            series.iter().flat_map(|(_, v)| cum(v)).chain(b.iter().copied()).filter(|&y| y > 0.0).fold(y_max, f64::min)
                / 2.0;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d(0f64..rounds, (y_min..y_max).log_scale())
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("round")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc(format!("{unit} sent, cumulated (log scale)"))
            .y_label_formatter(&|y| format!("{y:.2e}"))
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(|e| e.to_string())?;
        let pts = |v: &[f64]| -> Vec<(f64, f64)> { v.iter().enumerate().map(|(i, &y)| (i as f64 + 1.0, y)).collect() };
        chart
            .draw_series(LineSeries::new(pts(&b), BLACK.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label("budget (cumulated)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.stroke_width(2)));
        for (i, (label, v)) in series.iter().enumerate() {
            let c = palette(i);
            chart
                .draw_series(LineSeries::new(pts(&cum(v)), c.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())
    })
    .map_err(fail(what))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ink(img: &RgbImage) -> usize {
        img.rgb.chunks_exact(3).filter(|p| p != &[255, 255, 255]).count()
    }

    #[test]
    fn rank_map_draws_cells_labels_and_marks() {
        let rounds: Vec<RoundRanks> = (0..6)
            .map(|t| RoundRanks { ranks: vec![(t % 3) as f64 * 4.0; 5], skipped: t == 2, lost: t == 4 })
            .collect();
        let m = RankMap { title: "ranks".into(), sites: (0..5).map(|l| site_label(l, "q_proj")).collect(), rounds };
        let img = rank_map(&m).unwrap();
        assert!(img.width > 200 && img.height > 100);
        assert_eq!(img.rgb.len(), (img.width * img.height * 3) as usize);
        // The lost round's red outline is drawn.
        assert!(img.rgb.chunks_exact(3).any(|p| p == [255, 0, 0]));
        // Text is set: the picture differs from the same picture without labels.
        assert!(ink(&img) > 2000);
    }

    #[test]
    fn loss_curves_and_spend_draw_lines() {
        let s = LossSeries {
            label: "fixed".into(),
            steps: vec![0.0, 10.0, 20.0],
            seeds: vec![vec![3.0, 2.5, 2.2], vec![3.1, 2.6, 2.1]],
        };
        let img = loss_curves("val", &[s]).unwrap();
        assert!(img.rgb.chunks_exact(3).any(|p| p == [31, 119, 180]), "the first series' colour is drawn");
        let img = spend("spend", "bits", &[("fixed".into(), vec![1.0, 2.0, 3.0])], &[2.0, 2.0, 2.0]).unwrap();
        assert!(ink(&img) > 1000);
    }
}
