//! A TensorBoard event-file writer: scalars, histograms, images (PNG) and text.
//!
//! Why our own (~300 lines) instead of a crate: `tensorboard-rs` is unmaintained since 2022, its
//! `add_histogram`/`add_text` panic as unimplemented and it pulls protobuf 2.28 (RUSTSEC-2024-0437);
//! `tboard` needs `protoc` at build time and has no text or histogram-from-values helpers;
//! `tfrecord` works but drags optional tch 0.13/ndarray 0.15 features and fixed TF buckets. The
//! format itself is small: TFRecord framing (length, masked CRC32C, payload, masked CRC32C) around
//! `tensorflow.Event` protobufs, which we declare below with prost's derive macros (no protoc).
//! The tests read our files back with the Python `tensorboard` package's own event reader.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use prost::Message;

/// `tensorflow.Event` and the parts of `tensorflow.Summary` we write, declared field by field as in
/// `tensorflow/core/util/event.proto` and `tensorflow/core/framework/summary.proto`. Proto `oneof`
/// members are written as optional fields, which is the same wire format.
mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Event {
        #[prost(double, tag = "1")]
        pub wall_time: f64,
        #[prost(int64, tag = "2")]
        pub step: i64,
        #[prost(string, optional, tag = "3")]
        pub file_version: Option<String>,
        #[prost(message, optional, tag = "5")]
        pub summary: Option<Summary>,
        #[prost(message, optional, tag = "7")]
        pub session_log: Option<SessionLog>,
    }

    /// `tensorflow.SessionLog`; `status` 1 is `START`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SessionLog {
        #[prost(int32, tag = "1")]
        pub status: i32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Summary {
        #[prost(message, repeated, tag = "1")]
        pub value: Vec<Value>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Value {
        #[prost(string, tag = "1")]
        pub tag: String,
        #[prost(float, optional, tag = "2")]
        pub simple_value: Option<f32>,
        #[prost(message, optional, tag = "4")]
        pub image: Option<Image>,
        #[prost(message, optional, tag = "5")]
        pub histo: Option<HistogramProto>,
        #[prost(message, optional, tag = "8")]
        pub tensor: Option<TensorProto>,
        #[prost(message, optional, tag = "9")]
        pub metadata: Option<SummaryMetadata>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Image {
        #[prost(int32, tag = "1")]
        pub height: i32,
        #[prost(int32, tag = "2")]
        pub width: i32,
        /// 1 grey, 3 RGB, 4 RGBA.
        #[prost(int32, tag = "3")]
        pub colorspace: i32,
        #[prost(bytes = "vec", tag = "4")]
        pub encoded_image_string: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HistogramProto {
        #[prost(double, tag = "1")]
        pub min: f64,
        #[prost(double, tag = "2")]
        pub max: f64,
        #[prost(double, tag = "3")]
        pub num: f64,
        #[prost(double, tag = "4")]
        pub sum: f64,
        #[prost(double, tag = "5")]
        pub sum_squares: f64,
        /// Right edge of each bucket; bucket i holds values in (limit[i-1], limit[i]].
        #[prost(double, repeated, tag = "6")]
        pub bucket_limit: Vec<f64>,
        #[prost(double, repeated, tag = "7")]
        pub bucket: Vec<f64>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SummaryMetadata {
        #[prost(message, optional, tag = "1")]
        pub plugin_data: Option<PluginData>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PluginData {
        #[prost(string, tag = "1")]
        pub plugin_name: String,
        #[prost(bytes = "vec", tag = "2")]
        pub content: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorProto {
        /// `tensorflow.DataType`; 7 is DT_STRING.
        #[prost(int32, tag = "1")]
        pub dtype: i32,
        #[prost(message, optional, tag = "2")]
        pub tensor_shape: Option<TensorShapeProto>,
        #[prost(bytes = "vec", repeated, tag = "8")]
        pub string_val: Vec<Vec<u8>>,
    }

    /// An empty shape is a scalar.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorShapeProto {}
}

const DT_STRING: i32 = 7;
/// Flush to disk at least this often so a running TensorBoard sees progress.
const FLUSH_EVERY_SECS: f64 = 2.0;
/// Number of equal-width buckets for value histograms.
const HISTOGRAM_BUCKETS: usize = 30;

/// Writes one `events.out.tfevents.*` file in a log directory.
pub struct SummaryWriter {
    path: PathBuf,
    out: BufWriter<File>,
    last_flush: Instant,
}

impl SummaryWriter {
    /// Creates `logdir` (and parents) and a new event file in it.
    pub fn new(logdir: impl AsRef<Path>) -> io::Result<Self> {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let logdir = logdir.as_ref();
        std::fs::create_dir_all(logdir).map_err(|e| with_path(e, logdir))?;
        let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = logdir.join(format!("events.out.tfevents.{secs:010}.{host}.{}.{n}", std::process::id()));
        let file = File::create(&path).map_err(|e| with_path(e, &path))?;
        let mut w = SummaryWriter { path, out: BufWriter::new(file), last_flush: Instant::now() };
        w.write_event(proto::Event {
            wall_time: wall_time(),
            step: 0,
            file_version: Some("brain.Event:2".into()),
            summary: None,
            session_log: None,
        })?;
        w.flush()?;
        Ok(w)
    }

    /// The event file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A scalar (shown in the Scalars tab).
    pub fn add_scalar(&mut self, tag: &str, value: f64, step: i64) -> io::Result<()> {
        self.write_value(step, proto::Value { tag: tag.into(), simple_value: Some(value as f32), ..Default::default() })
    }

    /// A histogram of `values` with equal-width buckets between their min and max.
    /// Non-finite values are skipped; an empty slice writes nothing.
    pub fn add_histogram(&mut self, tag: &str, values: &[f64], step: i64) -> io::Result<()> {
        match histogram(values) {
            Some(h) => self.write_value(step, proto::Value { tag: tag.into(), histo: Some(h), ..Default::default() }),
            None => Ok(()),
        }
    }

    /// An RGB image, `rgb` row-major `height × width × 3`, stored as PNG.
    pub fn add_image_rgb(&mut self, tag: &str, width: u32, height: u32, rgb: &[u8], step: i64) -> io::Result<()> {
        let png = encode_png(width, height, rgb)?;
        let image =
            proto::Image { height: height as i32, width: width as i32, colorspace: 3, encoded_image_string: png };
        self.write_value(step, proto::Value { tag: tag.into(), image: Some(image), ..Default::default() })
    }

    /// Logs a sites × rounds picture of ranks: `columns[t][l]` is site `l`'s value in round `t`
    /// (sites down, rounds across), coloured over `[lo, hi]`, `cell` pixels per entry. One helper
    /// for every run that records ranks per round (policy training, scheduled fine-tuning).
    pub fn add_rank_heatmap(
        &mut self,
        tag: &str,
        columns: &[Vec<f64>],
        (lo, hi): (f64, f64),
        cell: u32,
        step: i64,
    ) -> io::Result<()> {
        let rows = columns.first().map_or(0, Vec::len);
        let cols = columns.len();
        let mut values = vec![0.0; rows * cols];
        for (c, col) in columns.iter().enumerate() {
            for (r, v) in col.iter().take(rows).enumerate() {
                values[r * cols + c] = *v;
            }
        }
        let img = heatmap(&values, rows, cols, lo, hi, cell);
        self.add_image_rgb(tag, img.width, img.height, &img.rgb, step)
    }

    /// A text summary (rendered as Markdown in the Text tab).
    pub fn add_text(&mut self, tag: &str, text: &str, step: i64) -> io::Result<()> {
        let tensor = proto::TensorProto {
            dtype: DT_STRING,
            tensor_shape: Some(proto::TensorShapeProto {}),
            string_val: vec![text.as_bytes().to_vec()],
        };
        let metadata = proto::SummaryMetadata {
            plugin_data: Some(proto::PluginData { plugin_name: "text".into(), content: Vec::new() }),
        };
        self.write_value(
            step,
            proto::Value { tag: tag.into(), tensor: Some(tensor), metadata: Some(metadata), ..Default::default() },
        )
    }

    /// Marks a restart at `step` (TensorFlow's `SessionLog.START`): TensorBoard's readers then drop
    /// every event of the log directory at `step` or later that came before this mark, so the
    /// steps an interrupted run logged after its last checkpoint do not appear twice once the
    /// run resumes from that checkpoint.
    pub fn add_session_start(&mut self, step: i64) -> io::Result<()> {
        const START: i32 = 1;
        self.write_event(proto::Event {
            wall_time: wall_time(),
            step,
            file_version: None,
            summary: None,
            session_log: Some(proto::SessionLog { status: START }),
        })?;
        self.flush()
    }

    /// Flushes buffered events to the OS.
    pub fn flush(&mut self) -> io::Result<()> {
        self.last_flush = Instant::now();
        self.out.flush().map_err(|e| with_path(e, &self.path))
    }

    fn write_value(&mut self, step: i64, value: proto::Value) -> io::Result<()> {
        let summary = proto::Summary { value: vec![value] };
        self.write_event(proto::Event {
            wall_time: wall_time(),
            step,
            file_version: None,
            summary: Some(summary),
            session_log: None,
        })?;
        if self.last_flush.elapsed().as_secs_f64() > FLUSH_EVERY_SECS {
            self.flush()?;
        }
        Ok(())
    }

    fn write_event(&mut self, event: proto::Event) -> io::Result<()> {
        let data = event.encode_to_vec();
        let len = (data.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(data.len() + 16);
        record.extend_from_slice(&len);
        record.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        record.extend_from_slice(&data);
        record.extend_from_slice(&masked_crc32c(&data).to_le_bytes());
        self.out.write_all(&record).map_err(|e| with_path(e, &self.path))
    }
}

impl Drop for SummaryWriter {
    fn drop(&mut self) {
        let _ = self.out.flush();
    }
}

/// TFRecord's CRC: CRC32C rotated right by 15 bits plus a constant, so that a CRC of data that
/// itself contains CRCs stays well distributed.
fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn wall_time() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn with_path(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn histogram(values: &[f64]) -> Option<proto::HistogramProto> {
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.is_empty() {
        return None;
    }
    let min = finite.iter().copied().fold(f64::INFINITY, f64::min);
    let max = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let n = if max > min { HISTOGRAM_BUCKETS } else { 1 };
    let width = (max - min) / n as f64;
    let bucket_limit: Vec<f64> = (1..=n).map(|i| if i == n { max } else { min + width * i as f64 }).collect();
    let mut bucket = vec![0.0; n];
    for &v in &finite {
        // First bucket whose right edge is >= v (values equal to min land in bucket 0).
        let i = if width > 0.0 { (((v - min) / width).ceil() as usize).saturating_sub(1).min(n - 1) } else { 0 };
        bucket[i] += 1.0;
    }
    Some(proto::HistogramProto {
        min,
        max,
        num: finite.len() as f64,
        sum: finite.iter().sum(),
        sum_squares: finite.iter().map(|v| v * v).sum(),
        bucket_limit,
        bucket,
    })
}

/// Encodes 8-bit RGB pixels (row-major) as PNG.
pub fn encode_png(width: u32, height: u32, rgb: &[u8]) -> io::Result<Vec<u8>> {
    if rgb.len() != (width as usize) * (height as usize) * 3 || width == 0 || height == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("image data has {} bytes, expected {width}×{height}×3 (non-empty)", rgb.len()),
        ));
    }
    let mut png = Vec::new();
    let mut enc = png::Encoder::new(&mut png, width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().map_err(io::Error::other)?;
    w.write_image_data(rgb).map_err(io::Error::other)?;
    w.finish().map_err(io::Error::other)?;
    Ok(png)
}

/// An RGB raster ready for [`SummaryWriter::add_image_rgb`].
#[derive(Debug, Clone, PartialEq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Row-major `height × width × 3` bytes.
    pub rgb: Vec<u8>,
}

/// Renders a `rows × cols` matrix (row-major) as a heatmap, each cell `cell × cell` pixels,
/// colours from dark blue (low) through green to yellow (high), scaled to `[lo, hi]`.
/// Used for the sites × rounds rank image.
pub fn heatmap(values: &[f64], rows: usize, cols: usize, lo: f64, hi: f64, cell: u32) -> RgbImage {
    assert_eq!(values.len(), rows * cols, "heatmap: values must be rows × cols");
    let (w, h) = (cols as u32 * cell, rows as u32 * cell);
    let mut rgb = Vec::with_capacity((w * h * 3) as usize);
    let span = if hi > lo { hi - lo } else { 1.0 };
    for y in 0..h {
        for x in 0..w {
            let v = values[(y / cell) as usize * cols + (x / cell) as usize];
            rgb.extend_from_slice(&colormap(((v - lo) / span).clamp(0.0, 1.0)));
        }
    }
    RgbImage { width: w.max(1), height: h.max(1), rgb }
}

/// A perceptually ordered colormap (piecewise-linear approximation of viridis).
fn colormap(t: f64) -> [u8; 3] {
    const STOPS: [[f64; 3]; 5] =
        [[68.0, 1.0, 84.0], [59.0, 82.0, 139.0], [33.0, 145.0, 140.0], [94.0, 201.0, 98.0], [253.0, 231.0, 37.0]];
    let x = t * (STOPS.len() - 1) as f64;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    let f = x - i as f64;
    let mut c = [0u8; 3];
    for k in 0..3 {
        c[k] = (STOPS[i][k] + f * (STOPS[i + 1][k] - STOPS[i][k])).round() as u8;
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_matches_tensorflow() {
        // Value from TensorFlow's crc32c_test: Mask(Value("foo")) where Value("foo") = 0xa8b3f6ac... we
        // check the mask/unmask round trip and a known CRC32C instead (RFC 3720 test vector).
        assert_eq!(crc32c::crc32c(&[0u8; 32]), 0x8a91_36aa);
        let crc = crc32c::crc32c(b"123456789");
        assert_eq!(crc, 0xe306_9283);
        let masked = masked_crc32c(b"123456789");
        let unmasked = masked.wrapping_sub(0xa282_ead8).rotate_left(15);
        assert_eq!(unmasked, crc);
    }

    #[test]
    fn histogram_buckets_count_every_value() {
        let v: Vec<f64> = (0..100).map(|i| i as f64).collect();
        let h = histogram(&v).unwrap();
        assert_eq!(h.bucket.iter().sum::<f64>(), 100.0);
        assert_eq!(h.bucket_limit.len(), HISTOGRAM_BUCKETS);
        assert_eq!(*h.bucket_limit.last().unwrap(), 99.0);
        assert_eq!(h.min, 0.0);
        assert_eq!(h.sum, 4950.0);
        let constant = histogram(&[4.0, 4.0, f64::NAN]).unwrap();
        assert_eq!((constant.num, constant.bucket.clone()), (2.0, vec![2.0]));
        assert!(histogram(&[]).is_none());
    }

    #[test]
    fn heatmap_size_and_colours() {
        let img = heatmap(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], 2, 3, 0.0, 5.0, 4);
        assert_eq!((img.width, img.height, img.rgb.len()), (12, 8, 12 * 8 * 3));
        assert_eq!(&img.rgb[0..3], &[68, 1, 84]);
        let last = img.rgb.len() - 3;
        assert_eq!(&img.rgb[last..], &[253, 231, 37]);
    }

    #[test]
    fn png_rejects_wrong_size() {
        assert!(encode_png(2, 2, &[0; 11]).is_err());
        assert!(encode_png(2, 2, &[0; 12]).unwrap().starts_with(b"\x89PNG"));
    }
}
