/// What can go wrong loading or running a model. Messages name the file, tensor or field.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// A weights or tokenizer file that does not parse or lacks what a Llama model needs.
    #[error("{path}: {message}")]
    Format { path: String, message: String },
    /// A tensor whose shape is not what the architecture says.
    #[error("tensor {name}: expected shape {expected:?}, found {found:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A request the model or cache cannot serve (too long, bad block table, ...).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An error of one stage of a step, named so that a device error says where it arose.
    #[error("{stage}: {source}")]
    Stage {
        stage: &'static str,
        source: Box<RuntimeError>,
    },
}

impl RuntimeError {
    /// This error, as one of `stage`.
    pub fn during(self, stage: &'static str) -> RuntimeError {
        RuntimeError::Stage {
            stage,
            source: Box::new(self),
        }
    }
}
