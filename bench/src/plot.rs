//! The timeline: for A and A′ (restarts) above B (deploys), closed loop, the requests answered
//! per 10 ms window stacked by the generation that answered, failures in
//! red below the axis, and markers for each restart or deploy; under each
//! chart, the life of every process. Both charts share one y scale, so
//! their heights compare. SVG text needs no font files.

use std::fmt::Display;
use std::path::Path;

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::scenarios::{Cycle, Lifespan, Measurements, Trace, Way};
use baton_testkit::load::WINDOW;

/// Restarts / deploys drawn; with more, the chart would be too dense to
/// read (the report's tables count them all).
pub const SHOWN_CYCLES: usize = 5;

const WIDTH: u32 = 1400;
const PANEL_HEIGHT: u32 = 480;
const LANES_HEIGHT: u32 = 130;
const Y_LABEL_AREA: u32 = 70;
/// The column on the right that holds the legends.
const LEGEND_WIDTH: u32 = 230;

/// One colour per generation; never red, which is for failures.
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),  // blue
    RGBColor(255, 127, 14),  // orange
    RGBColor(44, 160, 44),   // green
    RGBColor(148, 103, 189), // purple
    RGBColor(23, 190, 207),  // cyan
    RGBColor(140, 86, 75),   // brown
    RGBColor(188, 189, 34),  // olive
    RGBColor(227, 119, 194), // pink
];
const FAILED: RGBColor = RGBColor(220, 0, 0);
/// Restart / deploy start, new process ready, old process exited.
const MARKERS: [RGBColor; 3] = [RGBColor(140, 140, 140), RGBColor(0, 140, 0), BLACK];

type Chart<'a> = ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;
type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

pub fn write(path: &Path, measured: &Measurements) -> Result<(), String> {
    let panels = [
        Panel {
            title: "A: the app alone, restarted stop-then-start (what systemctl restart does)",
            trace: &measured
                .handoff(Way::Restart, false)
                .ok_or("no closed-loop A to draw")?
                .trace,
            markers: ["SIGTERM sent", "new process answers", "old process exited"],
        },
        Panel {
            title: "A′: the same, the socket held across the restart (plain socket activation)",
            trace: &measured
                .handoff(Way::HeldRestart, false)
                .ok_or("no closed-loop A′ to draw")?
                .trace,
            markers: ["SIGTERM sent", "new process answers", "old process exited"],
        },
        Panel {
            title: "B: the app under baton, deployed with baton reload --wait",
            trace: &measured.deploys().ok_or("no closed-loop B to draw")?.trace,
            markers: [
                "reload requested",
                "new generation ready",
                "old generation exited",
            ],
        },
    ];
    let lying: Vec<Panel> = measured
        .lying
        .iter()
        .map(|run| Panel {
            title: if run.probation.is_zero() {
                "F: a release that says READY=1 and dies 1 s later, without probation"
            } else {
                "F: the same release with probation: the old generation serves on"
            },
            trace: &run.trace,
            markers: [
                "deploy requested",
                "new generation ready",
                "old generation exited",
            ],
        })
        .collect();
    let panels: Vec<Panel> = panels.into_iter().chain(lying).collect();
    let height = PANEL_HEIGHT * panels.len() as u32;
    let root = SVGBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE).map_err(text)?;
    let y_range = y_range(&panels);
    for (area, panel) in root.split_evenly((panels.len(), 1)).iter().zip(&panels) {
        panel.draw(area, y_range)?;
    }
    root.present().map_err(text)
}

fn text(e: impl Display) -> String {
    e.to_string()
}

fn colour(generation: u64) -> RGBColor {
    PALETTE[(generation % PALETTE.len() as u64) as usize]
}

/// One y scale for all panels: the highest stack of answers, and room
/// below the axis for the most failures in one window.
fn y_range(panels: &[Panel]) -> (f64, f64) {
    let (mut answered, mut failed) = (1.0f64, 0.0f64);
    for panel in panels {
        let shown = panel.last_window();
        let timeline = &panel.trace.tally.timeline;
        let mut per_window = std::collections::BTreeMap::<u32, u32>::new();
        for (&(w, _), &n) in timeline.answered.range(..(shown, 0)) {
            *per_window.entry(w).or_default() += n;
        }
        answered = answered.max(per_window.values().copied().max().unwrap_or(0).into());
        failed = failed.max(
            timeline
                .failed
                .range(..shown)
                .map(|(_, &n)| n)
                .max()
                .unwrap_or(0)
                .into(),
        );
    }
    let top = answered * 1.15;
    (-failed.max(top * 0.12) * 1.1, top)
}

struct Panel<'a> {
    title: &'static str,
    trace: &'a Trace,
    /// Names of the three markers (see [`MARKERS`]).
    markers: [&'static str; 3],
}

impl Panel<'_> {
    /// Seconds drawn: everything, or up to shortly after the last shown cycle.
    fn x_end(&self) -> f64 {
        let cycles = &self.trace.cycles;
        if cycles.len() <= SHOWN_CYCLES {
            return self.trace.end;
        }
        let last = &cycles[SHOWN_CYCLES - 1];
        let last_end = [last.ready, last.drain_end]
            .into_iter()
            .flatten()
            .fold(last.start, f64::max);
        (last_end + 0.4).min(self.trace.end)
    }

    fn last_window(&self) -> u32 {
        (self.x_end() / WINDOW.as_secs_f64()) as u32
    }

    /// The chart of requests above the lanes of processes, each with its
    /// legend in a column on the right (so it never hides a bar).
    fn draw(&self, area: &Area, y_range: (f64, f64)) -> Result<(), String> {
        let x_end = self.x_end();
        let (upper, lower) = area.split_vertically(PANEL_HEIGHT - LANES_HEIGHT);
        let (upper, upper_legend) = upper.split_horizontally(WIDTH - LEGEND_WIDTH);
        let (lower, lower_legend) = lower.split_horizontally(WIDTH - LEGEND_WIDTH);
        let mut chart = ChartBuilder::on(&upper)
            .caption(self.title, ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(0)
            .y_label_area_size(Y_LABEL_AREA)
            .build_cartesian_2d(0.0..x_end, y_range.0..y_range.1)
            .map_err(text)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .y_desc("requests per 10 ms (failed: below 0)")
            .y_label_formatter(&|v| format!("{:.0}", v.abs()))
            .draw()
            .map_err(text)?;
        self.draw_requests(&mut chart, y_range)?;
        self.draw_markers(&mut chart, y_range)?;
        let mut entries = vec![
            (Swatch::Generations, "answered, by generation"),
            (Swatch::Block(FAILED.to_rgba()), "failed (and a mark below)"),
        ];
        entries.extend(
            MARKERS
                .into_iter()
                .zip(self.markers)
                .map(|(c, name)| (Swatch::Line(c), name)),
        );
        legend(&upper_legend, 45, &entries)?;
        self.draw_lanes(&lower, x_end)?;
        let base = colour(1);
        let phases = [
            (Swatch::Block(base.mix(0.3).to_rgba()), "booting"),
            (Swatch::Block(base.to_rgba()), "serving"),
            (Swatch::Block(base.mix(0.6).to_rgba()), "draining"),
        ];
        legend(&lower_legend, 10, &phases)
    }

    /// Stacked answers per window by generation, and failures below 0.
    fn draw_requests(&self, chart: &mut Chart, (low, high): (f64, f64)) -> Result<(), String> {
        let timeline = &self.trace.tally.timeline;
        let shown = self.last_window();
        let width = WINDOW.as_secs_f64();
        let mut bars = Vec::new();
        let (mut window, mut height) = (u32::MAX, 0.0);
        for (&(w, generation), &n) in timeline.answered.range(..(shown, 0)) {
            if w != window {
                (window, height) = (w, 0.0);
            }
            let x = f64::from(w) * width;
            let top = height + f64::from(n);
            bars.push(Rectangle::new(
                [(x, height), (x + width, top)],
                colour(generation).filled(),
            ));
            height = top;
        }
        chart.draw_series(bars).map_err(text)?;
        let failures = timeline.failed.range(..shown).map(|(&w, &n)| {
            let x = f64::from(w) * width;
            Rectangle::new([(x, 0.0), (x + width, -f64::from(n))], FAILED.filled())
        });
        chart.draw_series(failures).map_err(text)?;
        // A bar of one failure is a pixel high: a mark under each window with
        // failures makes them impossible to miss.
        let mark_y = low + (high - low) * 0.03;
        let marks = timeline.failed.range(..shown).map(|(&w, _)| {
            let x = (f64::from(w) + 0.5) * width;
            TriangleMarker::new((x, mark_y), 5, FAILED.filled())
        });
        chart.draw_series(marks).map_err(text)?;
        Ok(())
    }

    fn draw_markers(&self, chart: &mut Chart, (low, high): (f64, f64)) -> Result<(), String> {
        let moments: [fn(&Cycle) -> Option<f64>; 3] =
            [|c| Some(c.start), |c| c.ready, |c| c.drain_end];
        for (moment, colour) in moments.into_iter().zip(MARKERS) {
            let lines = self
                .trace
                .cycles
                .iter()
                .take(SHOWN_CYCLES)
                .filter_map(moment);
            let style = colour.stroke_width(1);
            let lines = lines.map(|x| PathElement::new(vec![(x, low), (x, high)], style));
            chart.draw_series(lines).map_err(text)?;
        }
        Ok(())
    }

    /// Each process as a bar: booting (pale), serving (full), draining
    /// (middle). Consecutive generations alternate rows, so an overlap in
    /// time shows as two bars one above the other.
    fn draw_lanes(&self, area: &Area, x_end: f64) -> Result<(), String> {
        let mut chart = ChartBuilder::on(area)
            .margin(10)
            .margin_top(0)
            .x_label_area_size(40)
            .y_label_area_size(Y_LABEL_AREA)
            .build_cartesian_2d(0.0..x_end, 0.0..2.0)
            .map_err(text)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .y_labels(0)
            .y_desc("processes")
            .x_desc("seconds since the load started")
            .draw()
            .map_err(text)?;
        for life in &self.trace.lifespans {
            let end = life.exited.unwrap_or(self.trace.end).min(x_end);
            if life.spawned >= x_end || end <= 0.0 {
                continue;
            }
            chart.draw_series(phases(life, end)).map_err(text)?;
            let label_at = (
                life.spawned.max(0.0) + 0.01,
                (life.generation % 2) as f64 + 0.72,
            );
            let label = Text::new(format!("{}", life.generation), label_at, ("sans-serif", 13));
            chart.draw_series(std::iter::once(label)).map_err(text)?;
        }
        Ok(())
    }
}

/// The booting, serving and draining bars of one process, up to `end`.
fn phases(life: &Lifespan, end: f64) -> Vec<Rectangle<(f64, f64)>> {
    let row = (life.generation % 2) as f64;
    let ready = life.ready.unwrap_or(end).min(end);
    let drain = life.drain.unwrap_or(end).min(end).max(ready);
    let base = colour(life.generation);
    let spans = [
        (life.spawned, ready, base.mix(0.3)),
        (ready, drain, base.mix(1.0)),
        (drain, end, base.mix(0.6)),
    ];
    spans
        .into_iter()
        .filter(|(from, to, _)| to > from)
        .map(|(from, to, style)| {
            Rectangle::new(
                [(from.max(0.0), row + 0.15), (to, row + 0.85)],
                style.filled(),
            )
        })
        .collect()
}

/// What a legend entry shows.
enum Swatch {
    /// A few generation colours side by side.
    Generations,
    Block(RGBAColor),
    Line(RGBColor),
}

/// Draws `entries` down a legend column, starting `top` pixels down.
fn legend(area: &Area, top: i32, entries: &[(Swatch, &str)]) -> Result<(), String> {
    for (i, (swatch, label)) in entries.iter().enumerate() {
        let y = top + 22 * i as i32;
        match swatch {
            Swatch::Generations => {
                for k in 0..3 {
                    let (x, colour) = (6 * k as i32, colour(k + 1));
                    let block = Rectangle::new([(x, y - 6), (x + 6, y + 6)], colour.filled());
                    area.draw(&block).map_err(text)?;
                }
            }
            Swatch::Block(colour) => {
                let block = Rectangle::new([(0, y - 6), (18, y + 6)], colour.filled());
                area.draw(&block).map_err(text)?;
            }
            Swatch::Line(colour) => {
                let line = PathElement::new(vec![(0, y), (18, y)], colour.stroke_width(2));
                area.draw(&line).map_err(text)?;
            }
        }
        let label = Text::new(label.to_string(), (26, y - 8), ("sans-serif", 14));
        area.draw(&label).map_err(text)?;
    }
    Ok(())
}
