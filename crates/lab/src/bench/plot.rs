//! PNG line charts for the benchmark reports: a latency against the offered rate, one line per
//! strategy.
//!
//! Drawn with `plotters` on its bitmap backend and encoded with `png`. The text is set in DejaVu
//! Sans, embedded in the binary by the `dejavu` crate (Bitstream Vera licence, redistributable),
//! so drawing needs no system font, no fontconfig and no C library, at build or at run time:
//! plotters measures it (its `ab_glyph` feature) and `GlyphBackend` draws it with `ab_glyph`.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ab_glyph::{Font, FontRef, ScaleFont};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::register_font;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters_backend::{BackendColor, BackendCoord, BackendTextStyle, DrawingErrorKind};

/// Width of every chart, in pixels.
pub const WIDTH: u32 = 1000;
/// Height of every chart, in pixels.
pub const HEIGHT: u32 = 600;

/// The family the embedded font is registered under (the name plotters asks for by default).
const FONT: &str = "sans-serif";
const TITLE_SIZE: f64 = 26.0;
const AXIS_DESC_SIZE: f64 = 20.0;
const TICK_SIZE: f64 = 16.0;
const LEGEND_SIZE: f64 = 17.0;
const LINE_WIDTH: u32 = 3;
/// At most this many tick labels on the x axis, and on the y axis.
const X_LABELS: usize = 12;
const Y_LABELS: usize = 10;
const MARKER_RADIUS: f64 = 5.0;
/// Width of the legend's sample of line and marker, and the legend's inner margin, in pixels.
const LEGEND_KEY: i32 = 40;
const LEGEND_MARGIN: i32 = 10;
/// Gap kept between the legend and the plot's frame, and between the legend and the data.
const LEGEND_INSET: i32 = 10;
/// The legend may take this share of the plot's height at most when room is made for it above
/// the data; past that it is placed where it covers the least.
const LEGEND_MAX_SHARE: f64 = 0.4;

/// Tableau 10: distinct hues that stay apart for the common colour-vision deficiencies.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];
/// Each series also gets its own marker shape, so lines are told apart without colour too.
const MARKERS: [Marker; 4] = [
    Marker::Circle,
    Marker::Square,
    Marker::Triangle,
    Marker::Diamond,
];

/// One line of a plot: a strategy's points (x = offered rate in requests/s, y = a latency in ms).
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

impl Series {
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self {
            name: name.into(),
            points,
        }
    }
}

/// Why a chart could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("the embedded font could not be loaded")]
    Font,
    #[error("drawing the chart: {0}")]
    Draw(String),
    #[error("encoding the PNG: {0}")]
    Encode(#[from] png::EncodingError),
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Draws a line chart to a PNG file: title, x and y axis labels, one coloured line with markers
/// per series, a legend. Y axis from 0; log scale not needed.
///
/// The chart is [`WIDTH`] x [`HEIGHT`] pixels. Points that are NaN or infinite are skipped; each
/// series is drawn in the order of its x values. The y axis goes below 0 only for negative data.
/// The legend goes where it covers no line, the y axis made taller for it if need be. A series
/// with no point left is still named in the legend, as "(no data)"; a chart with no point at all
/// says "no data".
pub fn line_chart_png(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<(), PlotError> {
    let png = render_png(title, x_label, y_label, series)?;
    std::fs::write(path, png).map_err(|source| PlotError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// The chart as the bytes of a PNG file.
fn render_png(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<Vec<u8>, PlotError> {
    let fonts = fonts()?;
    let lines = clean(series);
    let legend_size = legend_size(&lines)?;
    let mut rgb = vec![255u8; WIDTH as usize * HEIGHT as usize * 3];
    {
        let bitmap = BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT));
        let root = GlyphBackend::new(bitmap, fonts).into_drawing_area();
        draw(&root, title, x_label, y_label, &lines, legend_size)
            .map_err(|e| PlotError::Draw(e.to_string()))?;
        root.present().map_err(|e| PlotError::Draw(e.to_string()))?;
    }
    encode_png(&rgb, WIDTH, HEIGHT)
}

/// DejaVu Sans, regular and bold, parsed for [`GlyphBackend`].
struct Fonts {
    regular: FontRef<'static>,
    bold: FontRef<'static>,
}

/// The fonts, loaded once per process, and registered with plotters (which measures text with
/// them) under [`FONT`].
fn fonts() -> Result<&'static Fonts, PlotError> {
    static FONTS: OnceLock<Option<Fonts>> = OnceLock::new();
    FONTS
        .get_or_init(|| {
            let (regular, bold) = (dejavu::sans::regular(), dejavu::sans::bold());
            register_font(FONT, FontStyle::Normal, regular).ok()?;
            register_font(FONT, FontStyle::Bold, bold).ok()?;
            Some(Fonts {
                regular: FontRef::try_from_slice(regular).ok()?,
                bold: FontRef::try_from_slice(bold).ok()?,
            })
        })
        .as_ref()
        .ok_or(PlotError::Font)
}

/// A backend that draws text itself and hands everything else to the backend it wraps.
///
/// plotters 0.3.7 draws `ab_glyph` text with each glyph's left side bearing dropped and the pen
/// rounded to whole pixels, so letters are spaced unevenly ("roun d-robin"); this places every
/// glyph at its exact, subpixel position. Text is anchored in the box plotters measured and laid
/// the chart out with, with capitals and digits centred in it.
struct GlyphBackend<B> {
    inner: B,
    fonts: &'static Fonts,
}

impl<B> GlyphBackend<B> {
    fn new(inner: B, fonts: &'static Fonts) -> Self {
        Self { inner, fonts }
    }
}

impl<B: DrawingBackend> DrawingBackend for GlyphBackend<B> {
    type ErrorType = B::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.inner.get_size()
    }

    fn ensure_prepared(&mut self) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.ensure_prepared()
    }

    fn present(&mut self) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.present()
    }

    fn draw_pixel(
        &mut self,
        point: BackendCoord,
        color: BackendColor,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.draw_pixel(point, color)
    }

    fn draw_line<S: plotters_backend::BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.draw_line(from, to, style)
    }

    fn draw_rect<S: plotters_backend::BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.draw_rect(upper_left, bottom_right, style, fill)
    }

    fn draw_path<S: plotters_backend::BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.draw_path(path, style)
    }

    fn draw_circle<S: plotters_backend::BackendStyle>(
        &mut self,
        center: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.draw_circle(center, radius, style, fill)
    }

    fn fill_polygon<S: plotters_backend::BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.fill_polygon(vert, style)
    }

    fn blit_bitmap(
        &mut self,
        pos: BackendCoord,
        size: (u32, u32),
        src: &[u8],
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.blit_bitmap(pos, size, src)
    }

    fn draw_text<S: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &S,
        pos: BackendCoord,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        let color = style.color();
        if color.alpha == 0.0 || text.is_empty() {
            return Ok(());
        }
        let ((min_x, min_y), (max_x, max_y)) = style
            .layout_box(text)
            .map_err(|e| DrawingErrorKind::FontError(Box::new(e)))?;
        let (width, height) = (max_x - min_x, max_y - min_y);
        let anchor = style.anchor();
        let dx = match anchor.h_pos {
            HPos::Left => 0,
            HPos::Center => -width / 2,
            HPos::Right => -width,
        } - min_x;
        let dy = match anchor.v_pos {
            VPos::Top => 0,
            VPos::Center => -height / 2,
            VPos::Bottom => -height,
        } - min_y;

        let font = match style.style() {
            FontStyle::Bold => &self.fonts.bold,
            _ => &self.fonts.regular,
        };
        let scaled = font.as_scaled(style.size() as f32);
        let cap_height = font
            .outline_glyph(scaled.scaled_glyph('H'))
            .map_or(scaled.ascent() * 0.75, |h| -h.px_bounds().min.y);
        let baseline = (height as f32 + cap_height) / 2.0;
        let transform = style.transform();
        let (w, h) = self.inner.get_size();
        let inner = &mut self.inner;

        let mut caret = 0.0f32;
        let mut previous = None;
        for c in text.chars() {
            let id = scaled.glyph_id(c);
            if let Some(previous) = previous {
                caret += scaled.kern(previous, id);
            }
            previous = Some(id);
            let glyph =
                id.with_scale_and_position(scaled.scale(), ab_glyph::point(caret, baseline));
            caret += scaled.h_advance(id);
            let Some(outlined) = font.outline_glyph(glyph) else {
                continue; // a space
            };
            let bounds = outlined.px_bounds();
            let (left, top) = (bounds.min.x as i32 + dx, bounds.min.y as i32 + dy);
            let mut result = Ok(());
            outlined.draw(|gx, gy, coverage| {
                if result.is_err() || coverage <= 0.0 {
                    return;
                }
                let (x, y) = transform.transform(left + gx as i32, top + gy as i32);
                let (x, y) = (pos.0 + x, pos.1 + y);
                if x >= 0 && y >= 0 && (x as u32) < w && (y as u32) < h {
                    let alpha = color.alpha * f64::from(coverage.min(1.0));
                    result = inner.draw_pixel((x, y), BackendColor { alpha, ..color });
                }
            });
            result?;
        }
        Ok(())
    }
}

fn encode_png(rgb: &[u8], width: u32, height: u32) -> Result<Vec<u8>, PlotError> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(rgb)?;
    writer.finish()?;
    Ok(out)
}

/// A series ready to draw: its legend text, and its plottable points sorted by x.
struct Line {
    label: String,
    points: Vec<(f64, f64)>,
}

/// Finite, and small enough that the axis arithmetic cannot overflow.
fn plottable(v: f64) -> bool {
    v.is_finite() && v.abs() <= 1e300
}

fn clean(series: &[Series]) -> Vec<Line> {
    series
        .iter()
        .map(|s| {
            let mut points: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|&(x, y)| plottable(x) && plottable(y))
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            let label = if points.is_empty() {
                format!("{} (no data)", s.name)
            } else {
                s.name.clone()
            };
            Line { label, points }
        })
        .collect()
}

/// The smallest box holding every point: (x range, y range), or None without points.
fn bounds(lines: &[Line]) -> Option<((f64, f64), (f64, f64))> {
    let mut points = lines.iter().flat_map(|l| l.points.iter().copied());
    let (x0, y0) = points.next()?;
    Some(
        points.fold(((x0, x0), (y0, y0)), |((xl, xh), (yl, yh)), (x, y)| {
            ((xl.min(x), xh.max(x)), (yl.min(y), yh.max(y)))
        }),
    )
}

/// The x axis: the data with a little room on both sides (not below 0 for data that is not).
fn x_axis(bounds: Option<(f64, f64)>) -> Range<f64> {
    let Some((lo, hi)) = bounds else {
        return 0.0..1.0;
    };
    let pad = if hi > lo {
        (hi - lo) * 0.04
    } else {
        (lo.abs() * 0.1).max(1.0)
    };
    let start = if lo >= 0.0 {
        (lo - pad).max(0.0)
    } else {
        lo - pad
    };
    start..hi + pad
}

/// The y axis: from 0 (or below, for negative data) to a little above the data.
fn y_axis(bounds: Option<(f64, f64)>) -> Range<f64> {
    let Some((lo, hi)) = bounds else {
        return 0.0..1.0;
    };
    let bottom = if lo < 0.0 { lo * 1.08 } else { 0.0 };
    let top = if hi > 0.0 { hi * 1.08 } else { 1.0 };
    bottom..top
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    lines: &[Line],
    legend_size: Option<(i32, i32)>,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let bounds = bounds(lines);
    let x_range = x_axis(bounds.map(|b| b.0));
    let mut y_range = y_axis(bounds.map(|b| b.1));

    // Where the legend goes depends on where the data falls in pixels, so the plot's size in
    // pixels is needed first: lay the chart out once on a blank canvas.
    root.fill(&WHITE)?;
    let plot_dims = {
        let chart = builder(root, title).build_cartesian_2d(0.0..1.0, 0.0..1.0)?;
        chart.plotting_area().dim_in_pixel()
    };
    root.fill(&WHITE)?;

    let mut legend_at = None;
    if let Some(size) = legend_size {
        let mut placed = place_legend(lines, &x_range, &y_range, plot_dims, size);
        // Covering data: raise the y axis so the data stays below the legend, if that leaves the
        // data enough room.
        if placed.1 > 0 && bounds.is_some() {
            let (_, h) = plot_dims;
            let room = f64::from(size.1 + 2 * LEGEND_INSET);
            if h > 0 && room <= f64::from(h) * LEGEND_MAX_SHARE {
                let (lo, hi) = (y_range.start, y_range.end);
                y_range = lo..lo + (hi - lo) * f64::from(h) / (f64::from(h) - room);
                placed = place_legend(lines, &x_range, &y_range, plot_dims, size);
            }
        }
        legend_at = Some(placed.0);
    }

    let (x_ticks, y_ticks) = (
        TickFormat::new(&x_range, X_LABELS),
        TickFormat::new(&y_range, Y_LABELS),
    );
    let x_format = |v: &f64| x_ticks.format(*v);
    let y_format = |v: &f64| y_ticks.format(*v);
    let mut chart = builder(root, title).build_cartesian_2d(x_range, y_range)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .axis_desc_style((FONT, AXIS_DESC_SIZE))
        .label_style((FONT, TICK_SIZE))
        .x_labels(X_LABELS)
        .y_labels(Y_LABELS)
        .x_label_formatter(&x_format)
        .y_label_formatter(&y_format)
        .max_light_lines(1)
        .bold_line_style(RGBColor(215, 215, 215))
        .light_line_style(RGBColor(240, 240, 240))
        .axis_style(RGBColor(90, 90, 90))
        .draw()?;

    for (i, line) in lines.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let marker = MARKERS[i % MARKERS.len()];
        let stroke = color.stroke_width(LINE_WIDTH);
        // A white rim sets each marker off from the lines under it.
        let (rim, body) = (
            marker.outline(MARKER_RADIUS + 2.0),
            marker.outline(MARKER_RADIUS),
        );
        let key_marker = |outline: &[(i32, i32)]| -> Vec<(i32, i32)> {
            outline
                .iter()
                .map(|&(x, y)| (x + LEGEND_KEY / 2 - 4, y))
                .collect()
        };
        let (key_rim, key_body) = (key_marker(&rim), key_marker(&body));
        chart
            .draw_series(std::iter::once(PathElement::new(
                line.points.clone(),
                stroke,
            )))?
            .label(line.label.as_str())
            .legend(move |(x, y)| {
                EmptyElement::at((x, y))
                    + PathElement::new(vec![(2, 0), (LEGEND_KEY - 10, 0)], stroke)
                    + Polygon::new(key_rim.clone(), WHITE.filled())
                    + Polygon::new(key_body.clone(), color.filled())
            });
        chart.draw_series(line.points.iter().map(|&p| {
            EmptyElement::at(p)
                + Polygon::new(rim.clone(), WHITE.filled())
                + Polygon::new(body.clone(), color.filled())
        }))?;
    }

    if bounds.is_none() {
        let area = chart.plotting_area().strip_coord_spec();
        let (w, h) = area.dim_in_pixel();
        let style = TextStyle::from((FONT, AXIS_DESC_SIZE).into_font())
            .color(&RGBColor(120, 120, 120))
            .pos(Pos::new(HPos::Center, VPos::Center));
        area.draw(&Text::new("no data", (w as i32 / 2, h as i32 / 2), style))?;
    }

    if let Some((x, y)) = legend_at {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::Coordinate(x, y))
            .margin(LEGEND_MARGIN)
            .legend_area_size(LEGEND_KEY)
            .label_font((FONT, LEGEND_SIZE))
            .background_style(WHITE.mix(0.9))
            .border_style(RGBColor(170, 170, 170))
            .draw()?;
    }
    Ok(())
}

/// The chart's frame: caption, margins, room for the tick labels and axis descriptions.
fn builder<'a, 'b, DB: DrawingBackend>(
    root: &'a DrawingArea<DB, Shift>,
    title: &str,
) -> ChartBuilder<'a, 'b, DB> {
    let mut builder = ChartBuilder::on(root);
    builder
        .caption(title, (FONT, TITLE_SIZE, FontStyle::Bold))
        .margin_top(12)
        .margin_left(16)
        .margin_right(40)
        .margin_bottom(12)
        .x_label_area_size(62)
        .y_label_area_size(90);
    builder
}

/// Formats the ticks of an axis over `range` with at most `labels` ticks: as many decimals as
/// the step between ticks needs, no float noise (0.30000000000000004), no trailing zeros, and
/// large numbers in scientific notation.
struct TickFormat {
    /// Smallest step between two ticks (a round number), or 0 for an empty range.
    step: f64,
}

impl TickFormat {
    fn new(range: &Range<f64>, labels: usize) -> Self {
        let rough = (range.end - range.start).abs() / labels.max(1) as f64;
        let step = if rough > 0.0 && rough.is_finite() {
            let magnitude = 10f64.powf(rough.log10().floor());
            [1.0, 2.0, 5.0, 10.0]
                .into_iter()
                .map(|m| m * magnitude)
                .find(|&step| step >= rough)
                .unwrap_or(10.0 * magnitude)
        } else {
            0.0
        };
        Self { step }
    }

    fn format(&self, v: f64) -> String {
        let v = if v.abs() <= self.step * 1e-6 { 0.0 } else { v };
        if v.abs() >= 1e6 {
            return format!("{v:.2e}");
        }
        let decimals = if self.step >= 1.0 || self.step <= 0.0 {
            0
        } else {
            // One more than the step needs, for steps such as 0.25; trailing zeros go below.
            ((-self.step.log10()).ceil() as usize + 1).min(12)
        };
        let text = format!("{v:.decimals$}");
        if text.contains('.') {
            text.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            text
        }
    }
}

/// The legend's size in pixels, as plotters lays it out; None without series.
fn legend_size(lines: &[Line]) -> Result<Option<(i32, i32)>, PlotError> {
    if lines.is_empty() {
        return Ok(None);
    }
    let mut text = MultiLineText::<_, &str>::new((0, 0), (FONT, LEGEND_SIZE));
    for line in lines {
        text.push_line(line.label.as_str());
    }
    let (w, h) = text
        .estimate_dimension()
        .map_err(|e| PlotError::Draw(e.to_string()))?;
    Ok(Some((
        w + LEGEND_KEY + 2 * LEGEND_MARGIN,
        h + 2 * LEGEND_MARGIN,
    )))
}

/// Where the legend covers the fewest data in the plot (`dims`, in pixels), trying the corners
/// first, then the middles of the sides: its top-left corner in plot pixels, and how many
/// sampled pixels of the lines it covers (0: none).
fn place_legend(
    lines: &[Line],
    x: &Range<f64>,
    y: &Range<f64>,
    dims: (u32, u32),
    (lw, lh): (i32, i32),
) -> ((i32, i32), usize) {
    let (w, h) = (
        i32::try_from(dims.0).unwrap_or(i32::MAX),
        i32::try_from(dims.1).unwrap_or(i32::MAX),
    );
    let to_pixels = |(px, py): (f64, f64)| {
        (
            (px - x.start) / (x.end - x.start) * f64::from(w - 1),
            (y.end - py) / (y.end - y.start) * f64::from(h - 1),
        )
    };
    // Each line's points and a sample every 2 pixels along its segments (markers included).
    let mut samples = Vec::new();
    for line in lines {
        let pixels: Vec<(f64, f64)> = line.points.iter().map(|&p| to_pixels(p)).collect();
        samples.extend(pixels.first().copied());
        for pair in pixels.windows(2) {
            let ((ax, ay), (bx, by)) = (pair[0], pair[1]);
            let length = (bx - ax).hypot(by - ay);
            let steps = (length / 2.0).ceil().clamp(1.0, 10_000.0) as usize;
            samples.extend((1..=steps).map(|k| {
                let t = k as f64 / steps as f64;
                (ax + (bx - ax) * t, ay + (by - ay) * t)
            }));
        }
    }
    let (left, center, right) = (LEGEND_INSET, (w - lw) / 2, w - lw - LEGEND_INSET);
    let (top, middle, bottom) = (LEGEND_INSET, (h - lh) / 2, h - lh - LEGEND_INSET);
    let candidates = [
        (left, top),
        (right, top),
        (center, top),
        (right, bottom),
        (left, middle),
        (right, middle),
        (left, bottom),
        (center, bottom),
        (center, middle),
    ];
    let covered = |(cx, cy): (i32, i32)| {
        let (x0, x1) = (
            f64::from(cx - LEGEND_INSET),
            f64::from(cx + lw + LEGEND_INSET),
        );
        let (y0, y1) = (
            f64::from(cy - LEGEND_INSET),
            f64::from(cy + lh + LEGEND_INSET),
        );
        samples
            .iter()
            .filter(|&&(sx, sy)| (x0..=x1).contains(&sx) && (y0..=y1).contains(&sy))
            .count()
    };
    candidates
        .into_iter()
        .map(|at| (at, covered(at)))
        .min_by_key(|&(_, count)| count)
        .unwrap_or(((left, top), 0))
}

/// The shape that marks a series' points.
#[derive(Debug, Clone, Copy)]
enum Marker {
    Circle,
    Square,
    Triangle,
    Diamond,
}

impl Marker {
    /// The marker's outline around (0, 0), in pixels, for a marker of about `r` pixels' radius.
    fn outline(self, r: f64) -> Vec<(i32, i32)> {
        let scaled = |points: &[(f64, f64)]| {
            points
                .iter()
                .map(|&(x, y)| ((x * r).round() as i32, (y * r).round() as i32))
                .collect()
        };
        match self {
            Marker::Circle => (0..20)
                .map(|k| {
                    let angle = f64::from(k) * std::f64::consts::TAU / 20.0;
                    (
                        (angle.cos() * r).round() as i32,
                        (angle.sin() * r).round() as i32,
                    )
                })
                .collect(),
            Marker::Square => scaled(&[(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]),
            Marker::Triangle => scaled(&[(0.0, -1.25), (1.1, 0.7), (-1.1, 0.7)]),
            Marker::Diamond => scaled(&[(0.0, -1.2), (1.2, 0.0), (0.0, 1.2), (-1.2, 0.0)]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];

    /// A path in the temporary directory for this test, removed when dropped.
    struct TempPng(PathBuf);

    impl TempPng {
        fn new(name: &str) -> Self {
            let file = format!("fleetpick-plot-{}-{name}.png", std::process::id());
            Self(std::env::temp_dir().join(file))
        }
    }

    impl Drop for TempPng {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// Width and height from the IHDR chunk, read by hand: the signature (8 bytes), the chunk's
    /// length (4) and type (4), then width and height as big-endian u32s.
    fn png_dimensions(bytes: &[u8]) -> (u32, u32) {
        assert!(
            bytes.len() > 24,
            "too short for a PNG: {} bytes",
            bytes.len()
        );
        assert_eq!(bytes[..8], PNG_SIGNATURE, "not a PNG signature");
        assert_eq!(&bytes[12..16], b"IHDR", "first chunk is not IHDR");
        let width = u32::from_be_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
        let height = u32::from_be_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
        (width, height)
    }

    /// The decoded RGB pixels of a PNG this module wrote.
    fn decode(bytes: &[u8]) -> Vec<u8> {
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut pixels).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb);
        pixels.truncate(info.buffer_size());
        pixels
    }

    fn pixels_of(pixels: &[u8], color: RGBColor) -> usize {
        pixels
            .chunks_exact(3)
            .filter(|p| p[0] == color.0 && p[1] == color.1 && p[2] == color.2)
            .count()
    }

    fn write_and_read(name: &str, series: &[Series]) -> Vec<u8> {
        let file = TempPng::new(name);
        line_chart_png(
            &file.0,
            "TTFT p99 against offered rate",
            "offered rate (requests/s)",
            "TTFT p99 (ms)",
            series,
        )
        .unwrap();
        let bytes = std::fs::read(&file.0).unwrap();
        assert_eq!(png_dimensions(&bytes), (WIDTH, HEIGHT));
        bytes
    }

    #[test]
    fn two_series_make_a_png_with_both_lines() {
        let series = [
            Series::new(
                "round-robin",
                vec![(5.0, 120.0), (10.0, 180.0), (20.0, 900.0)],
            ),
            Series::new(
                "fleetpick",
                vec![(5.0, 100.0), (10.0, 130.0), (20.0, 260.0)],
            ),
        ];
        let bytes = write_and_read("two-series", &series);
        assert_eq!(png_dimensions(&bytes), (1000, 600));
        let pixels = decode(&bytes);
        assert_eq!(pixels.len(), 1000 * 600 * 3);
        // Each series' colour covers a line's worth of pixels, not just its legend key.
        assert!(pixels_of(&pixels, PALETTE[0]) > 1000, "first line missing");
        assert!(pixels_of(&pixels, PALETTE[1]) > 1000, "second line missing");
        // The text is drawn: plenty of dark pixels beside the frame and ticks.
        let dark = pixels
            .chunks_exact(3)
            .filter(|p| p.iter().all(|&c| c < 80))
            .count();
        assert!(dark > 2000, "only {dark} dark pixels: no text?");
    }

    #[test]
    fn no_series_and_empty_series_draw() {
        let bytes = write_and_read("no-series", &[]);
        assert_eq!(bytes[..8], PNG_SIGNATURE);
        let bytes = write_and_read("empty-series", &[Series::new("idle", vec![])]);
        // Only the legend's key is in the series' colour: there is no line.
        assert!(pixels_of(&decode(&bytes), PALETTE[0]) < 300);
        // No title, no axis labels.
        let file = TempPng::new("untitled");
        line_chart_png(&file.0, "", "", "", &[Series::new("a", vec![(1.0, 2.0)])]).unwrap();
        assert_eq!(
            png_dimensions(&std::fs::read(&file.0).unwrap()),
            (WIDTH, HEIGHT)
        );
    }

    #[test]
    fn single_points_draw() {
        write_and_read("one-point", &[Series::new("alone", vec![(3.0, 42.0)])]);
        write_and_read("zero-point", &[Series::new("zero", vec![(0.0, 0.0)])]);
        write_and_read(
            "two-single-points",
            &[
                Series::new("a", vec![(1.0, 1.0)]),
                Series::new("b", vec![(1.0, 1.0)]),
            ],
        );
    }

    #[test]
    fn non_finite_points_are_skipped() {
        let nan = f64::NAN;
        let inf = f64::INFINITY;
        let series = [
            Series::new(
                "mixed",
                vec![
                    (1.0, 10.0),
                    (2.0, nan),
                    (nan, 5.0),
                    (3.0, inf),
                    (-inf, 1.0),
                    (4.0, 30.0),
                ],
            ),
            Series::new("all bad", vec![(nan, nan), (inf, -inf)]),
        ];
        write_and_read("non-finite", &series);
        let lines = clean(&series);
        assert_eq!(lines[0].points, vec![(1.0, 10.0), (4.0, 30.0)]);
        assert!(lines[1].points.is_empty());
        assert_eq!(lines[1].label, "all bad (no data)");
    }

    #[test]
    fn awkward_values_draw() {
        write_and_read(
            "awkward",
            &[
                Series::new("huge", vec![(1e300, 1e300), (-1e300, 2.0)]),
                Series::new("tiny", vec![(1e-9, 1e-12), (2e-9, 3e-12)]),
                Series::new("negative", vec![(-5.0, -3.0), (5.0, -1.0)]),
                Series::new("unsorted", vec![(9.0, 1.0), (1.0, 2.0), (5.0, 3.0)]),
            ],
        );
        let lines = clean(&[Series::new("u", vec![(9.0, 1.0), (1.0, 2.0), (5.0, 3.0)])]);
        assert_eq!(lines[0].points, vec![(1.0, 2.0), (5.0, 3.0), (9.0, 1.0)]);
    }

    #[test]
    fn axes_start_at_zero_and_hold_the_data() {
        assert_eq!(y_axis(None), 0.0..1.0);
        let y = y_axis(Some((40.0, 500.0)));
        assert_eq!(y.start, 0.0);
        assert!(y.end > 500.0);
        let x = x_axis(Some((2.0, 40.0)));
        assert!(x.start < 2.0 && x.start >= 0.0 && x.end > 40.0);
        let x = x_axis(Some((5.0, 5.0)));
        assert!(x.start < 5.0 && x.end > 5.0);
    }

    #[test]
    fn tick_labels_are_short_and_distinct() {
        let ticks = TickFormat::new(&(0.0..2400.0), 10);
        assert_eq!(ticks.format(0.0), "0");
        assert_eq!(ticks.format(2000.0), "2000");
        assert_eq!(ticks.format(1e-13), "0");
        let ticks = TickFormat::new(&(0.0..3.0), 12);
        assert_eq!(ticks.format(0.30000000000000004), "0.3");
        assert_eq!(ticks.format(-2.5), "-2.5");
        assert_eq!(ticks.format(1.0), "1");
        let ticks = TickFormat::new(&(0.001..0.003), 12);
        assert_eq!(ticks.format(0.0012), "0.0012");
        assert_eq!(ticks.format(0.0014), "0.0014");
        let ticks = TickFormat::new(&(0.0..8e6), 10);
        assert_eq!(ticks.format(2.5e6), "2.50e6");
        assert_eq!(TickFormat::new(&(1.0..1.0), 10).format(1.0), "1");
    }

    #[test]
    fn legend_avoids_the_data() {
        // A hockey stick: low on the left, climbing at the right.
        let lines = clean(&[Series::new(
            "s",
            vec![(0.0, 10.0), (50.0, 12.0), (80.0, 30.0), (100.0, 100.0)],
        )]);
        let (at, covered) =
            place_legend(&lines, &(0.0..100.0), &(0.0..100.0), (800, 400), (200, 60));
        assert_eq!(covered, 0);
        assert_eq!(at, (LEGEND_INSET, LEGEND_INSET), "upper left is free");
        // Falling data: the upper left is taken, the upper right is free.
        let lines = clean(&[Series::new("s", vec![(0.0, 100.0), (100.0, 5.0)])]);
        let (at, covered) =
            place_legend(&lines, &(0.0..100.0), &(0.0..100.0), (800, 400), (200, 60));
        assert_eq!(covered, 0);
        assert_eq!(at, (800 - 200 - LEGEND_INSET, LEGEND_INSET));
    }

    #[test]
    fn unwritable_path_is_an_error() {
        let path = std::env::temp_dir()
            .join("fleetpick-no-such-dir")
            .join("chart.png");
        let err = line_chart_png(&path, "t", "x", "y", &[]).unwrap_err();
        assert!(matches!(err, PlotError::Write { .. }), "{err}");
    }

    /// Renders a sample chart to look at: `FLEETPICK_SAMPLE_PNG=/tmp/sample.png cargo test --lib
    /// report::plot -- --ignored`.
    #[test]
    #[ignore = "writes a sample chart for a person to look at"]
    fn sample_chart() {
        let path = std::env::var_os("FLEETPICK_SAMPLE_PNG")
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("fleetpick-sample.png"));
        let rates = [2.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 40.0];
        let curve = |base: f64, knee: f64| -> Vec<(f64, f64)> {
            rates
                .iter()
                .map(|&r| {
                    (
                        r,
                        base + base * 0.4 * (r / knee) / (1.0 - (r / knee).min(0.97)),
                    )
                })
                .collect()
        };
        let mut saturated = curve(95.0, 36.0);
        saturated[8].1 = f64::NAN; // a run that timed out
        let series = [
            Series::new("round-robin", curve(110.0, 28.0)),
            Series::new("least-queue", curve(100.0, 33.0)),
            Series::new("fleetpick (kv_cache + queue + in_flight)", saturated),
        ];
        line_chart_png(
            &path,
            "Time to first token, p99, against offered rate",
            "offered rate (requests/s)",
            "TTFT p99 (ms)",
            &series,
        )
        .unwrap();
        println!("wrote {}", path.display());
    }
}
