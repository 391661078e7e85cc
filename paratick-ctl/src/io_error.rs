//! An I/O error with what was being done: the one `Io` variant of this library's error
//! types (the daemon's, the bench's, `observe`'s).

/// What failed, and why.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct IoError {
    /// What was being done ("cannot create /run/paratick").
    pub what: String,
    /// Why it failed.
    #[source]
    pub source: std::io::Error,
}

/// Adds what was being done to an I/O error: `.map_err(io("cannot create DIR"))?`.
pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> IoError {
    let what = what.into();
    move |source| IoError { what, source }
}
