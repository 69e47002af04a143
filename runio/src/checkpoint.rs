//! Checkpoints: safetensors weights plus JSON metadata, written atomically.
//!
//! A checkpoint is a directory:
//!
//! ```text
//! <dir>/checkpoint.json              metadata (format version, kind, step, config, state, weights ref)
//! <dir>/weights-00001200.safetensors the tensors, named as in the VarStore
//! ```
//!
//! `checkpoint.json` names its weights file together with the file's size and SHA-256, and it is
//! the commit point: the weights are written first (temp file, fsync, rename), then the JSON the
//! same way. A crash at any moment leaves the previous checkpoint readable; a truncated or edited
//! weights file is detected by its hash. Superseded weights files are removed only after the new
//! JSON is in place.
//!
//! The same atomic safetensors writer serves PEFT adapter export ([`write_safetensors`]).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Kind, Tensor};

/// The contents of a safetensors file: its tensors by name, in file order, and its metadata.
pub type SafetensorsFile = (Vec<(String, Tensor)>, HashMap<String, String>);

/// The checkpoint format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Kind of a rank-policy checkpoint (`rankpilot train`), checked by every reader.
pub const POLICY_KIND: &str = "policy";
/// Name of the metadata file inside a checkpoint directory.
pub const META_FILE: &str = "checkpoint.json";

/// Everything in `checkpoint.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CheckpointMeta {
    /// [`FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// What the weights are, e.g. `"policy"` or `"lora-adapter"`; readers check it.
    pub kind: String,
    /// Training step (environment steps, optimizer steps: the kind decides) at save time.
    pub step: u64,
    /// The configuration that produced the weights (presets, CLI options).
    pub config: serde_json::Value,
    /// Everything else needed to resume: RNG states, observation-normalizer statistics, counters.
    pub state: serde_json::Value,
    /// Weights file name, relative to the checkpoint directory.
    pub weights: String,
    /// Size of the weights file in bytes.
    pub weights_bytes: u64,
    /// Lower-case hex SHA-256 of the weights file.
    pub weights_sha256: String,
    /// `rankpilot <version>` that wrote the checkpoint.
    pub written_by: String,
}

/// Why a checkpoint could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// No `checkpoint.json` in the directory.
    #[error("{}: no checkpoint here (missing {META_FILE})", .dir.display())]
    Missing {
        /// The directory that was searched.
        dir: PathBuf,
    },
    /// The file exists but its content is not what it claims (truncated, edited, not JSON...).
    #[error("{}: corrupted or truncated checkpoint: {why}", .file.display())]
    Corrupt {
        /// The damaged file.
        file: PathBuf,
        /// What check failed.
        why: String,
    },
    /// Written by another format version.
    #[error("{}: checkpoint format version {found}, this rankpilot reads version {FORMAT_VERSION}", .file.display())]
    WrongVersion {
        /// The metadata file.
        file: PathBuf,
        /// The version found.
        found: u32,
    },
    /// A checkpoint of another kind (e.g. an adapter where a policy was expected).
    #[error("{}: checkpoint holds a `{found}`, expected a `{expected}`", .file.display())]
    WrongKind {
        /// The metadata file.
        file: PathBuf,
        /// Kind found in the file.
        found: String,
        /// Kind the caller asked for.
        expected: String,
    },
    /// Another process holds the directory's [`DirLock`].
    #[error("{}: another rankpilot process is writing to this directory (it holds {}/.lock); wait for it or choose another directory", .dir.display(), .dir.display())]
    Locked {
        /// The locked directory.
        dir: PathBuf,
    },
    /// An I/O failure, with the path.
    // The OS error is part of the message, not a `source`: a chain printer would repeat it.
    #[error("{}: {cause}", .path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        cause: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |cause| CheckpointError::Io { path: path.to_path_buf(), cause }
}

/// Writes a checkpoint into `dir` (created if needed), replacing any previous one atomically.
/// `meta`'s `format_version`, `weights*` and `written_by` fields are filled in here.
pub fn save(
    dir: &Path,
    kind: &str,
    step: u64,
    config: serde_json::Value,
    state: serde_json::Value,
    tensors: &[(String, Tensor)],
) -> Result<CheckpointMeta, CheckpointError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let weights = format!("weights-{step:08}.safetensors");
    let bytes =
        serialize_tensors(tensors, None).map_err(|why| CheckpointError::Corrupt { file: dir.join(&weights), why })?;
    let weights_path = dir.join(&weights);
    atomic_write(&weights_path, &bytes)?;
    let meta = CheckpointMeta {
        format_version: FORMAT_VERSION,
        kind: kind.to_string(),
        step,
        config,
        state,
        weights: weights.clone(),
        weights_bytes: bytes.len() as u64,
        weights_sha256: hex_sha256(&bytes),
        written_by: format!("rankpilot {}", env!("CARGO_PKG_VERSION")),
    };
    let json = serde_json::to_vec_pretty(&meta).expect("checkpoint metadata serializes");
    atomic_write(&dir.join(META_FILE), &json)?;
    // The new checkpoint is committed; drop weights files no longer referenced.
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with("weights-") && name.ends_with(".safetensors") && name != weights {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    Ok(meta)
}

/// Reads the checkpoint in `dir`, checking format version, kind, size and hash.
/// Tensors are returned on the CPU, in the file's order of names.
pub fn load(dir: &Path, expected_kind: &str) -> Result<(CheckpointMeta, Vec<(String, Tensor)>), CheckpointError> {
    let meta = read_meta(dir)?;
    let meta_path = dir.join(META_FILE);
    if meta.kind != expected_kind {
        return Err(CheckpointError::WrongKind { file: meta_path, found: meta.kind, expected: expected_kind.into() });
    }
    let weights_path = dir.join(&meta.weights);
    if meta.weights.contains('/') || meta.weights.contains("..") {
        return Err(CheckpointError::Corrupt {
            file: meta_path,
            why: format!("weights path `{}` leaves the directory", meta.weights),
        });
    }
    let bytes = fs::read(&weights_path).map_err(|e| match e.kind() {
        // The metadata names a file that is not there: the checkpoint is incomplete.
        std::io::ErrorKind::NotFound => CheckpointError::Corrupt {
            file: meta_path.clone(),
            why: format!("its weights file `{}` is missing", meta.weights),
        },
        _ => io_err(&weights_path)(e),
    })?;
    let corrupt = |why: String| CheckpointError::Corrupt { file: weights_path.clone(), why };
    if bytes.len() as u64 != meta.weights_bytes {
        return Err(corrupt(format!("{} bytes on disk, {} recorded in {META_FILE}", bytes.len(), meta.weights_bytes)));
    }
    if hex_sha256(&bytes) != meta.weights_sha256 {
        return Err(corrupt(format!("SHA-256 differs from the one recorded in {META_FILE}")));
    }
    let tensors = deserialize_tensors(&bytes).map_err(corrupt)?;
    Ok((meta, tensors))
}

/// Reads and checks only `checkpoint.json`.
pub fn read_meta(dir: &Path) -> Result<CheckpointMeta, CheckpointError> {
    let meta_path = dir.join(META_FILE);
    let text = match fs::read(&meta_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CheckpointError::Missing { dir: dir.to_path_buf() });
        }
        Err(e) => {
            return Err(CheckpointError::Io { path: meta_path, cause: e });
        }
    };
    // Check the version before the full schema, so an old or future file says so plainly.
    let value: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| CheckpointError::Corrupt { file: meta_path.clone(), why: e.to_string() })?;
    let found = value.get("format_version").and_then(|v| v.as_u64());
    match found {
        Some(v) if v == FORMAT_VERSION as u64 => {}
        Some(v) => {
            return Err(CheckpointError::WrongVersion { file: meta_path, found: v as u32 });
        }
        None => {
            return Err(CheckpointError::Corrupt { file: meta_path, why: "no `format_version` field".into() });
        }
    }
    serde_json::from_value(value).map_err(|e| CheckpointError::Corrupt { file: meta_path, why: e.to_string() })
}

/// Writes tensors as a safetensors file atomically, with optional header metadata
/// (PEFT adapters carry `{"format": "pt"}`).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<(), CheckpointError> {
    let bytes = serialize_tensors(tensors, metadata)
        .map_err(|why| CheckpointError::Corrupt { file: path.to_path_buf(), why })?;
    atomic_write(path, &bytes)
}

/// Reads every tensor of a safetensors file onto the CPU, with the header metadata.
pub fn read_safetensors(path: &Path) -> Result<SafetensorsFile, CheckpointError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    let corrupt = |why: String| CheckpointError::Corrupt { file: path.to_path_buf(), why };
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| corrupt(e.to_string()))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    Ok((deserialize_tensors(&bytes).map_err(corrupt)?, metadata))
}

/// Prefix of the temporary files [`atomic_write`] creates next to their target (then a random,
/// unpredictable suffix). [`DirLock::acquire`] removes leftovers of writers that died.
pub const TEMP_PREFIX: &str = ".rankpilot-tmp-";

/// Writes `bytes` to `path` via a new temporary file in the same directory (`tempfile`: a random
/// name, created with `O_EXCL`, so a planted file or symlink is never followed), fsync, rename,
/// and an fsync of the directory, so readers see either the old file or the complete new one.
/// Errors name `path`, not the temporary file.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .tempfile_in(dir)
        .map_err(|e| CheckpointError::Io { path: path.to_path_buf(), cause: without_temp_path(e) })?;
    tmp.write_all(bytes).map_err(io_err(path))?;
    tmp.as_file().sync_all().map_err(io_err(path))?;
    // On failure the temporary file is removed when `persist`'s error drops it.
    tmp.persist(path).map_err(|e| CheckpointError::Io { path: path.to_path_buf(), cause: e.error })?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes a directory's files into a new directory beside `target` (`write` fills it), then puts
/// it in `target`'s place in one step, so that a reader or a crash sees either the complete old
/// directory or the complete new one, never a mix (a squeezed adapter's tensors next to its old
/// config). Files of an existing `target` that `write` did not produce are carried over.
pub fn write_dir_atomically(
    target: &Path,
    write: impl FnOnce(&Path) -> Result<(), CheckpointError>,
) -> Result<(), CheckpointError> {
    let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(io_err(parent))?;
    let staged = tempfile::Builder::new().prefix(TEMP_PREFIX).tempdir_in(parent).map_err(io_err(target))?;
    write(staged.path())?;
    // A temporary directory is private (0700); the result is an ordinary directory.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(staged.path(), fs::Permissions::from_mode(0o755)).map_err(io_err(target))?;
    }
    if !target.exists() {
        fs::rename(staged.path(), target).map_err(io_err(target))?;
        // Renamed away: nothing is left for the guard to remove.
        let _ = staged.keep();
    } else {
        for e in fs::read_dir(target).map_err(io_err(target))?.flatten() {
            let to = staged.path().join(e.file_name());
            if e.file_type().is_ok_and(|t| t.is_file()) && !to.exists() {
                fs::copy(e.path(), &to).map_err(io_err(&e.path()))?;
            }
        }
        exchange(staged.path(), target)?;
        // `staged` now holds the old directory; the guard removes it.
    }
    if let Ok(d) = File::open(parent) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Swaps two directory entries atomically (Linux `renameat2(RENAME_EXCHANGE)`).
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> Result<(), CheckpointError> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(|e| io_err(p)(std::io::Error::other(e)));
    let (ca, cb) = (c(a)?, c(b)?);
    // SAFETY: two valid NUL-terminated paths, relative to the working directory.
    let rc =
        unsafe { libc::renameat2(libc::AT_FDCWD, ca.as_ptr(), libc::AT_FDCWD, cb.as_ptr(), libc::RENAME_EXCHANGE) };
    if rc == 0 { Ok(()) } else { Err(io_err(b)(std::io::Error::last_os_error())) }
}

/// Elsewhere the swap takes two renames: the old directory moves aside first, so a crash between
/// them leaves it complete beside the target.
#[cfg(not(target_os = "linux"))]
fn exchange(a: &Path, b: &Path) -> Result<(), CheckpointError> {
    let aside = a.with_extension("old");
    fs::rename(b, &aside).map_err(io_err(b))?;
    fs::rename(a, b).map_err(io_err(b))?;
    fs::rename(&aside, a).map_err(io_err(a))
}

/// `tempfile`'s error without the temporary file's path it appends (" at path …"): messages
/// name the file the user asked for.
fn without_temp_path(e: std::io::Error) -> std::io::Error {
    let text = e.to_string();
    let os = text.split(" at path ").next().unwrap_or(&text);
    std::io::Error::new(e.kind(), os.to_string())
}

/// An exclusive lock on an output directory, held while the value lives: one writer per
/// directory. Taken with the operating system's advisory file lock (`flock`) on `<dir>/.lock`,
/// so it is released when the process ends, however it ends.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Creates `dir` if needed and locks it, or fails at once with [`CheckpointError::Locked`]
    /// when another process holds it. Then removes temporary files of writers that died there.
    pub fn acquire(dir: &Path) -> Result<DirLock, CheckpointError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let path = dir.join(".lock");
        let file =
            fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io_err(&path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(CheckpointError::Locked { dir: dir.to_path_buf() }),
            Err(fs::TryLockError::Error(e)) => return Err(CheckpointError::Io { path, cause: e }),
        }
        remove_stale_temp_files(dir);
        Ok(DirLock { _file: file })
    }
}

/// Removes `dir`'s (and its subdirectories') leftover temporary files; only safe while holding
/// the directory's [`DirLock`], when no other writer can be using them.
fn remove_stale_temp_files(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Ok(kind) = e.file_type() else { continue };
        if kind.is_dir() && !kind.is_symlink() {
            remove_stale_temp_files(&e.path());
        } else if name.to_string_lossy().starts_with(TEMP_PREFIX) {
            let _ = fs::remove_file(e.path());
        }
    }
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A CPU copy of a tensor's bytes, in the form safetensors serializes.
struct RawTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &RawTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn kind_to_dtype(kind: Kind) -> Result<Dtype, String> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        other => {
            return Err(format!("tensor kind {other:?} cannot be stored in safetensors"));
        }
    })
}

fn dtype_to_kind(dtype: Dtype) -> Result<Kind, String> {
    Ok(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        other => return Err(format!("safetensors dtype {other:?} is not supported")),
    })
}

fn serialize_tensors(
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>, String> {
    let mut raw = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.detach().to_device(tch::Device::Cpu).contiguous();
        let numel = t.numel();
        let dtype = kind_to_dtype(t.kind()).map_err(|e| format!("{name}: {e}"))?;
        let mut data = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut data, numel).map_err(|e| format!("{name}: {e}"))?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        raw.push((name.clone(), RawTensor { dtype, shape, data }));
    }
    safetensors::serialize(raw.iter().map(|(n, r)| (n.as_str(), r)), metadata).map_err(|e| e.to_string())
}

fn deserialize_tensors(bytes: &[u8]) -> Result<Vec<(String, Tensor)>, String> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for name in st.names() {
        let view = st.tensor(name).map_err(|e| e.to_string())?;
        let kind = dtype_to_kind(view.dtype()).map_err(|e| format!("{name}: {e}"))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind).map_err(|e| format!("{name}: {e}"))?;
        out.push((name.to_string(), t));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<(String, Tensor)> {
        vec![
            ("net.weight".into(), Tensor::arange(6, (Kind::Float, tch::Device::Cpu)).view([2, 3])),
            ("norm.count".into(), Tensor::from_slice(&[7i64])),
        ]
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let state = serde_json::json!({"rng": [1, 2, 3], "obs_mean": [0.5]});
        save(dir.path(), "policy", 12, serde_json::json!({"lr": 3e-4}), state.clone(), &sample()).unwrap();
        let (meta, t) = load(dir.path(), "policy").unwrap();
        assert_eq!(meta.step, 12);
        assert_eq!(meta.state, state);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].0, "net.weight");
        assert_eq!(Vec::<f32>::try_from(t[0].1.flatten(0, -1)).unwrap(), vec![0., 1., 2., 3., 4., 5.]);
        assert_eq!(t[1].1.kind(), Kind::Int64);
    }

    #[test]
    fn newer_save_replaces_old_weights() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), "policy", 1, serde_json::Value::Null, serde_json::Value::Null, &sample()).unwrap();
        save(dir.path(), "policy", 2, serde_json::Value::Null, serde_json::Value::Null, &sample()).unwrap();
        let names: Vec<String> =
            fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.contains(&"weights-00000002.safetensors".to_string()));
    }

    #[test]
    fn detects_truncation_wrong_kind_version_and_missing() {
        let dir = tempfile::tempdir().unwrap();
        let meta = save(dir.path(), "policy", 3, serde_json::Value::Null, serde_json::Value::Null, &sample()).unwrap();
        let wpath = dir.path().join(&meta.weights);
        let original = fs::read(&wpath).unwrap();

        assert!(matches!(load(dir.path(), "lora-adapter"), Err(CheckpointError::WrongKind { .. })));

        fs::write(&wpath, &original[..original.len() - 5]).unwrap();
        let e = load(dir.path(), "policy").unwrap_err();
        assert!(matches!(e, CheckpointError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("truncated"), "{e}");

        let mut flipped = original.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0xff;
        fs::write(&wpath, &flipped).unwrap();
        assert!(load(dir.path(), "policy").unwrap_err().to_string().contains("SHA-256"));

        let mpath = dir.path().join(META_FILE);
        let json = fs::read_to_string(&mpath).unwrap().replace("\"format_version\": 1", "\"format_version\": 99");
        fs::write(&mpath, json).unwrap();
        let e = load(dir.path(), "policy").unwrap_err();
        assert!(matches!(e, CheckpointError::WrongVersion { found: 99, .. }), "{e}");

        fs::write(&mpath, "{\"format_version\": 1, \"kind\": ").unwrap();
        assert!(matches!(load(dir.path(), "policy"), Err(CheckpointError::Corrupt { .. })));

        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(load(empty.path(), "policy"), Err(CheckpointError::Missing { .. })));
    }

    #[test]
    fn safetensors_metadata_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("adapter_model.safetensors");
        let md = HashMap::from([("format".to_string(), "pt".to_string())]);
        write_safetensors(&p, &sample(), Some(md.clone())).unwrap();
        let (t, got) = read_safetensors(&p).unwrap();
        assert_eq!(got, md);
        assert_eq!(t[0].1.size(), vec![2, 3]);
        fs::write(&p, b"not a safetensors file").unwrap();
        assert!(matches!(read_safetensors(&p), Err(CheckpointError::Corrupt { .. })));
    }

    /// Issue 13, item 7: a file planted under the name the old writer used for its temporary
    /// file (a symlink to a victim) is neither followed nor overwritten.
    #[test]
    fn atomic_write_never_follows_a_planted_temp_name() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim.txt");
        fs::write(&victim, b"keep me").unwrap();
        let target = dir.path().join("t.json");
        std::os::unix::fs::symlink(&victim, dir.path().join(format!(".t.json.tmp-{}", std::process::id()))).unwrap();
        atomic_write(&target, b"{}").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep me");
        assert_eq!(fs::read(&target).unwrap(), b"{}");
        assert!(!fs::symlink_metadata(&target).unwrap().file_type().is_symlink());
        // A symlink at the target itself is replaced, not written through.
        fs::remove_file(&target).unwrap();
        std::os::unix::fs::symlink(&victim, &target).unwrap();
        atomic_write(&target, b"[]").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep me");
    }

    /// Issue 13, item 3: one writer per directory; the lock goes with its holder.
    #[test]
    fn a_locked_directory_refuses_a_second_writer_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let first = DirLock::acquire(&out).unwrap();
        let e = DirLock::acquire(&out).unwrap_err();
        assert!(matches!(e, CheckpointError::Locked { .. }), "{e}");
        assert!(e.to_string().contains("another rankpilot process"), "{e}");
        drop(first);
        DirLock::acquire(&out).unwrap();
    }

    /// Issue 13, item 7: temporary files left by a writer that died are removed by the next
    /// writer that takes the directory's lock (and only then).
    #[test]
    fn the_lock_holder_removes_stale_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("best")).unwrap();
        let stale = [dir.path().join(".rankpilot-tmp-Ab12cd"), dir.path().join("best/.rankpilot-tmp-Zz99yy")];
        for f in &stale {
            fs::write(f, b"half").unwrap();
        }
        fs::write(dir.path().join("keep.json"), b"{}").unwrap();
        let _lock = DirLock::acquire(dir.path()).unwrap();
        assert!(stale.iter().all(|f| !f.exists()));
        assert!(dir.path().join("keep.json").exists());
    }

    /// Issue 13, item 5: a directory written over itself changes in one step, and files the
    /// writer does not produce are kept.
    #[test]
    fn a_directory_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("adapter");
        write_dir_atomically(&target, |d| {
            atomic_write(&d.join("a.json"), b"old")?;
            atomic_write(&d.join("b.bin"), b"old")
        })
        .unwrap();
        fs::write(target.join("README.md"), b"mine").unwrap();
        // A writer that fails half-way leaves the old directory as it was.
        let e = write_dir_atomically(&target, |d| {
            atomic_write(&d.join("a.json"), b"new")?;
            Err(CheckpointError::Corrupt { file: d.join("b.bin"), why: "disk full".into() })
        });
        assert!(e.is_err());
        assert_eq!(fs::read(target.join("a.json")).unwrap(), b"old");
        write_dir_atomically(&target, |d| {
            atomic_write(&d.join("a.json"), b"new")?;
            atomic_write(&d.join("b.bin"), b"new")
        })
        .unwrap();
        assert_eq!(fs::read(target.join("a.json")).unwrap(), b"new");
        assert_eq!(fs::read(target.join("b.bin")).unwrap(), b"new");
        assert_eq!(fs::read(target.join("README.md")).unwrap(), b"mine");
        let left: Vec<String> =
            fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        assert_eq!(left, vec!["adapter".to_string()], "no staging directory is left behind");
    }
}
