//! Domain types for what a client asks to embed; a leaf.
//!
//! Owns: [`Input`] (what to embed, how, for whom), [`Content`] (text, an
//! image or both: never neither), [`ImageSource`] (an image as bytes or as a
//! URL still to fetch), [`Role`], [`Modality`]. Plain data: no HTTP types, no
//! tensors. The HTTP layer builds `Input<ImageSource>`s from JSON/multipart;
//! one typed step (fetching the URLs, `http::handlers`) turns them into
//! `Input`s with image bytes, which preprocessing turns into model-ready
//! [`crate::preprocess::Prepared`] items.
//!
//! Why the type parameter: an input whose image is still a URL must never
//! reach preprocessing. With the image's form in the type, `Batcher::embed`
//! takes `Input<Vec<u8>>` only, and no code has to remember to check.

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

/// A role name that is neither `query` nor `candidate`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}: expected \"query\" or \"candidate\"")]
pub struct UnknownRole(pub String);

impl std::str::FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "query" => Ok(Role::Query),
            "candidate" => Ok(Role::Candidate),
            other => Err(UnknownRole(other.to_string())),
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

/// Where an image comes from, as a request gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// Encoded image bytes (JPEG, PNG, ...), not yet decoded.
    Bytes(Vec<u8>),
    /// An `http(s)://` URL, fetched (or refused) before preprocessing.
    Url(String),
}

/// The content of one input: text, an image (`I`: its bytes, or an
/// [`ImageSource`] before URLs are fetched), or both. There is no empty
/// input: the request parsers refuse one before building an `Input`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content<I = Vec<u8>> {
    Text(String),
    Image(I),
    /// A composed input: an image and a text embedded together.
    Composed {
        text: String,
        image: I,
    },
}

impl<I> Content<I> {
    /// The content of an input that gives `text`, `image`, both or neither
    /// (`None`).
    pub fn from_parts(text: Option<String>, image: Option<I>) -> Option<Self> {
        match (text, image) {
            (Some(t), None) => Some(Content::Text(t)),
            (None, Some(i)) => Some(Content::Image(i)),
            (Some(text), Some(image)) => Some(Content::Composed { text, image }),
            (None, None) => None,
        }
    }

    pub fn modality(&self) -> Modality {
        match self {
            Content::Text(_) => Modality::Text,
            Content::Image(_) => Modality::Image,
            Content::Composed { .. } => Modality::Composed,
        }
    }

    pub fn text(&self) -> Option<&str> {
        match self {
            Content::Text(t) | Content::Composed { text: t, .. } => Some(t),
            Content::Image(_) => None,
        }
    }

    pub fn image(&self) -> Option<&I> {
        match self {
            Content::Image(i) | Content::Composed { image: i, .. } => Some(i),
            Content::Text(_) => None,
        }
    }

    /// The same content with its image turned into another form by `f`
    /// (fetching a URL), or `f`'s error.
    pub fn try_map_image<J, E>(self, f: impl FnOnce(I) -> Result<J, E>) -> Result<Content<J>, E> {
        Ok(match self {
            Content::Text(t) => Content::Text(t),
            Content::Image(i) => Content::Image(f(i)?),
            Content::Composed { text, image } => Content::Composed {
                text,
                image: f(image)?,
            },
        })
    }
}

/// One thing to embed, as the client sent it (image still encoded; `I` as in
/// [`Content`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input<I = Vec<u8>> {
    pub content: Content<I>,
    /// The task instruction (BGE-VL-MLLM folds a query's into its prompt).
    pub instruction: Option<String>,
    pub role: Role,
}

impl<I> Input<I> {
    /// A candidate with `content` and no instruction.
    pub fn new(content: Content<I>) -> Self {
        Input {
            content,
            instruction: None,
            role: Role::Candidate,
        }
    }

    pub fn text(t: impl Into<String>) -> Self {
        Input::new(Content::Text(t.into()))
    }

    pub fn image(image: I) -> Self {
        Input::new(Content::Image(image))
    }

    pub fn with_role(self, role: Role) -> Self {
        Input { role, ..self }
    }

    pub fn with_instruction(self, instruction: Option<String>) -> Self {
        Input {
            instruction,
            ..self
        }
    }

    pub fn modality(&self) -> Modality {
        self.content.modality()
    }

    /// The input's text, if it has one.
    pub fn text_part(&self) -> Option<&str> {
        self.content.text()
    }

    /// The input's image, if it has one.
    pub fn image_part(&self) -> Option<&I> {
        self.content.image()
    }

    /// [`Content::try_map_image`] over the input's content.
    pub fn try_map_image<J, E>(self, f: impl FnOnce(I) -> Result<J, E>) -> Result<Input<J>, E> {
        Ok(Input {
            content: self.content.try_map_image(f)?,
            instruction: self.instruction,
            role: self.role,
        })
    }
}

/// An input as a request gives it: its image may be a URL still to fetch.
pub type RequestInput = Input<ImageSource>;

impl RequestInput {
    /// The image's URL, when it is one.
    pub fn image_url(&self) -> Option<&str> {
        match self.content.image() {
            Some(ImageSource::Url(u)) => Some(u),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_is_built_from_its_parts_and_never_empty() {
        assert_eq!(
            Content::<u8>::from_parts(Some("a".into()), None),
            Some(Content::Text("a".into()))
        );
        assert_eq!(
            Content::from_parts(None, Some(7u8)).map(|c| c.modality()),
            Some(Modality::Image)
        );
        let both = Content::from_parts(Some("a".into()), Some(7u8)).unwrap();
        assert_eq!(both.modality(), Modality::Composed);
        assert_eq!((both.text(), both.image()), (Some("a"), Some(&7)));
        assert_eq!(Content::<u8>::from_parts(None, None), None);
    }

    #[test]
    fn mapping_the_image_keeps_text_role_and_instruction() {
        let input = Input::new(Content::Composed {
            text: "t".to_string(),
            image: ImageSource::Url("http://x/y.png".into()),
        })
        .with_role(Role::Query)
        .with_instruction(Some("find".into()));
        assert_eq!(input.image_url(), Some("http://x/y.png"));
        let fetched: Input = input.try_map_image(|_| Ok::<_, ()>(vec![1u8, 2])).unwrap();
        assert_eq!(fetched.text_part(), Some("t"));
        assert_eq!(fetched.image_part(), Some(&vec![1u8, 2]));
        assert_eq!(fetched.role, Role::Query);
        assert_eq!(fetched.instruction.as_deref(), Some("find"));
        let failed = Input::text("t").try_map_image(|_: ImageSource| Err::<Vec<u8>, _>("never"));
        assert_eq!(failed.map(|i| i.modality()), Ok(Modality::Text));
        assert_eq!(
            "boss".parse::<Role>().unwrap_err().to_string(),
            "unknown role \"boss\": expected \"query\" or \"candidate\""
        );
    }
}
