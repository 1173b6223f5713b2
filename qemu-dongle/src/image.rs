//! What a firmware image takes of its chip: flash (vector table, code, read-only and initialised
//! data) and static RAM (initialised and zeroed data: every buffer of the boards is a static), read from
//! the ELF's section headers.

use std::path::Path;

use object::{Object, ObjectSection, SectionKind};

/// A firmware image's use of flash and RAM, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageSize {
    /// Bytes written to flash.
    pub flash: u64,
    /// Bytes of RAM reserved before `main` runs (the stack comes on top).
    pub ram: u64,
}

/// Why an image could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The ELF.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not an ELF this can read.
    #[error("{path} is not a firmware ELF: {source}")]
    Parse {
        /// The ELF.
        path: String,
        /// Why.
        source: object::Error,
    },
}

/// Measures the ELF at `path`.
pub fn size(path: &Path) -> Result<ImageSize, ImageError> {
    let name = || path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| ImageError::Read {
        path: name(),
        source,
    })?;
    let file = object::File::parse(&*bytes).map_err(|source| ImageError::Parse {
        path: name(),
        source,
    })?;
    let mut size = ImageSize { flash: 0, ram: 0 };
    for section in file.sections() {
        match section.kind() {
            SectionKind::Text | SectionKind::ReadOnlyData | SectionKind::ReadOnlyString => {
                size.flash += section.size();
            }
            // Initialised data lives in flash and is copied to RAM at start.
            SectionKind::Data => {
                size.flash += section.size();
                size.ram += section.size();
            }
            SectionKind::UninitializedData => size.ram += section.size(),
            _ if section.name() == Ok(".vector_table") => size.flash += section.size(),
            _ => {}
        }
    }
    Ok(size)
}
