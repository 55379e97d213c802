//! Domain types for what a client asks to embed.
//!
//! Owns: [`Input`], [`Role`], [`Modality`]. These are plain data: no HTTP types,
//! no tensors. The HTTP layer builds them from JSON/multipart; preprocessing
//! turns them into model-ready [`crate::preprocess::Prepared`] items.

use serde::{Deserialize, Serialize};

/// Whether an input is a search query or a candidate (document) to be searched.
///
/// CLIP models ignore it; BGE-VL-MLLM builds a different prompt for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Query,
    #[default]
    Candidate,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "query" => Ok(Role::Query),
            "candidate" => Ok(Role::Candidate),
            other => Err(format!(
                "unknown role {other:?}: expected \"query\" or \"candidate\""
            )),
        }
    }
}

/// What an input carries: text, an image, or both (a composed query).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Modality {
    Text,
    Image,
    Composed,
}

impl Modality {
    pub fn as_str(self) -> &'static str {
        match self {
            Modality::Text => "text",
            Modality::Image => "image",
            Modality::Composed => "composed",
        }
    }

    /// Whether this modality carries text.
    pub fn has_text(self) -> bool {
        matches!(self, Modality::Text | Modality::Composed)
    }

    /// Whether this modality carries an image.
    pub fn has_image(self) -> bool {
        matches!(self, Modality::Image | Modality::Composed)
    }
}

/// One thing to embed, as the client sent it (image still encoded).
#[derive(Debug, Clone, Default)]
pub struct Input {
    pub text: Option<String>,
    /// Encoded image bytes (JPEG, PNG, ...), not yet decoded.
    pub image: Option<Vec<u8>>,
    pub instruction: Option<String>,
    pub role: Role,
}

impl Input {
    pub fn text(t: impl Into<String>) -> Self {
        Input {
            text: Some(t.into()),
            ..Default::default()
        }
    }

    pub fn image(bytes: Vec<u8>) -> Self {
        Input {
            image: Some(bytes),
            ..Default::default()
        }
    }

    /// The modality, or `None` when the input has neither text nor image.
    pub fn modality(&self) -> Option<Modality> {
        match (self.text.is_some(), self.image.is_some()) {
            (true, false) => Some(Modality::Text),
            (false, true) => Some(Modality::Image),
            (true, true) => Some(Modality::Composed),
            (false, false) => None,
        }
    }
}
