//! One error type for the runtime; every variant says what went wrong and how to fix it.
use std::path::PathBuf;

/// Errors from loading and running models.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model path that does not exist.
    #[error("model not found: {path}\n  fix: pass --model with an existing .gguf file or a Hugging Face folder, or run `safegeo model fetch` for the default model")]
    ModelNotFound {
        /// The path that was tried.
        path: PathBuf,
    },
    /// A model path that exists in name but cannot be opened (a symbolic-link loop, a dangling
    /// link, no permission).
    #[error("{path} cannot be opened as a model: {reason}\n  fix: point --model at the model file or folder itself (resolve the link), or fix its permissions")]
    ModelUnreadable {
        /// The path that was tried.
        path: PathBuf,
        /// What the system said.
        reason: String,
    },
    /// A file that is not a readable GGUF (bad magic, truncated, corrupt header).
    #[error("{path} is not a valid GGUF file: {reason}\n  fix: the file is truncated or corrupt; download it again (for the default model: `safegeo model fetch --force`)")]
    BadGguf {
        /// The file.
        path: PathBuf,
        /// What the reader reported.
        reason: String,
    },
    /// A downloaded or cached file whose checksum differs from the expected one.
    #[error("checksum mismatch for {path}: expected sha256 {expected}, found {found}\n  fix: delete the file and fetch it again (`safegeo model fetch --force`)")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// Expected hex digest.
        expected: String,
        /// Actual hex digest.
        found: String,
    },
    /// A tensor stored in a quantization that this build cannot read.
    #[error("tensor {tensor} in {path} uses an unsupported quantization ({dtype})\n  fix: convert the model to a supported type (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q8_K)")]
    UnsupportedQuant {
        /// File.
        path: PathBuf,
        /// Tensor name.
        tensor: String,
        /// The type as reported.
        dtype: String,
    },
    /// An architecture without an implementation.
    #[error("unsupported model architecture `{arch}`; supported: {supported}\n  fix: use a checkpoint of a supported family")]
    UnknownArchitecture {
        /// The architecture name from the file.
        arch: String,
        /// The supported names.
        supported: String,
    },
    /// A required metadata key or config field is absent.
    #[error(
        "{path}: missing `{key}`\n  fix: the model file is incomplete or of an unsupported layout"
    )]
    MissingKey {
        /// File.
        path: PathBuf,
        /// Key name.
        key: String,
    },
    /// A configuration that cannot describe a working model.
    #[error("{path}: inconsistent model configuration: {reason}\n  fix: the checkpoint's config.json or GGUF metadata is corrupt; download it again or correct it")]
    BadConfig {
        /// The checkpoint.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A safetensors file whose header or data cannot be read.
    #[error("{path}: unreadable safetensors: {reason}\n  fix: the file is corrupt or truncated; download or export it again")]
    BadSafetensors {
        /// The model folder.
        path: PathBuf,
        /// What the reader said.
        reason: String,
    },
    /// A weight holding NaN or an infinity.
    #[error("{path}: tensor `{name}` holds NaN or infinite values\n  fix: the checkpoint is corrupt (or was saved from a diverged run); use another one")]
    NonFinite {
        /// The checkpoint.
        path: PathBuf,
        /// The tensor (GGUF name).
        name: String,
    },
    /// A tensor whose shape disagrees with the model's configuration.
    #[error("{path}: tensor `{name}` has shape {found:?}, but the configuration asks for {expected:?}\n  fix: the checkpoint is corrupt or its config.json / GGUF metadata does not match its weights")]
    ShapeMismatch {
        /// The checkpoint.
        path: PathBuf,
        /// The tensor (GGUF name).
        name: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A checkpoint names a file outside its own folder.
    #[error("{index}: the shard `{name}` lies outside the model folder {dir}; refused\n  fix: keep every shard inside the folder, named relative to it")]
    OutsideModel {
        /// The file that names it.
        index: PathBuf,
        /// The name as written.
        name: String,
        /// The model folder.
        dir: PathBuf,
    },
    /// A required tensor is absent.
    #[error("{path}: missing tensor `{name}`\n  fix: the checkpoint is incomplete or not of the architecture it claims")]
    MissingTensor {
        /// File or folder.
        path: PathBuf,
        /// Tensor name.
        name: String,
    },
    /// No tokenizer could be built.
    #[error("no tokenizer for {path}: {reason}\n  fix: a Hugging Face folder needs a readable tokenizer.json (and a tokenizer_config.json, if present, of valid JSON); a GGUF needs tokenizer.ggml.* metadata")]
    Tokenizer {
        /// The model path.
        path: PathBuf,
        /// Detail.
        reason: String,
    },
    /// The chat template failed to render.
    #[error("chat template error: {0}\n  fix: pass --no-template to feed raw text, or check the model's chat template")]
    Template(String),
    /// Empty prompt.
    #[error("empty prompt: no tokens to run (the messages are empty, or the chat template renders them to nothing)\n  fix: give a non-empty --chat text (or messages with content); with a template that renders nothing, --no-template")]
    EmptyPrompt,
    /// A prompt longer than the model's context.
    #[error("prompt of {tokens} tokens (+{new_tokens} to generate) exceeds the context length {context}\n  fix: shorten the prompt or lower --max-new-tokens")]
    ContextOverflow {
        /// Prompt length.
        tokens: usize,
        /// Tokens to be generated.
        new_tokens: usize,
        /// Model context length.
        context: usize,
    },
    /// A bad argument value.
    #[error("invalid value: {0}")]
    Invalid(String),
    /// An output folder another run is writing into.
    #[error("{path} is in use by {holder}\n  fix: wait for that run to finish, or write into another folder")]
    Busy {
        /// The folder.
        path: PathBuf,
        /// Who holds it (`another safegeo run (PID N)`).
        holder: String,
    },
    /// I/O failure with the path involved.
    #[error("{path}: {cause}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause: in the message, and not a `source`, so a chain of errors prints it once.
        cause: std::io::Error,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias for the runtime.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause,
        }
    }
}
