//! Turning request JSON into [`RequestInput`]s while it is parsed: the
//! input shorthand (a bare string), input objects, lists of inputs, inline
//! images (base64, data URLs) and image URLs ([`ImageSource::Url`], which
//! the handlers fetch or refuse before anything is embedded).
//!
//! Owns the streaming [`serde`] visitors that build inputs straight from the
//! body, checking the [`BodyLimits`] (input count, text length in characters,
//! image size in bytes) as each value is read, so a body over a limit is
//! refused at the first value past it and costs no more than the body itself;
//! and the messages that name the input and field at fault. Produces plain
//! [`Labeled`] inputs; it does not decode images (preprocessing does) and
//! knows nothing of models.

use std::cell::RefCell;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use super::error::{cut, quote, ApiError};
use crate::config::ServerConfig;
use crate::input::{Content, ImageSource, Input, RequestInput, Role};

const LENIENT: GeneralPurposeConfig =
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
const STANDARD_LENIENT: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, LENIENT);
const URL_SAFE_LENIENT: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, LENIENT);

/// Limits checked while a request body is read, before anything is built
/// past them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimits {
    /// Most inputs in one request (`server.max_inputs_per_request`).
    pub max_inputs: usize,
    /// Longest text or instruction, in characters (`server.max_text_chars`).
    pub max_text_chars: usize,
    /// Largest encoded image, in bytes (`server.max_image_bytes`).
    pub max_image_bytes: usize,
}

impl BodyLimits {
    /// No limits (for tests and tools that parse trusted bodies).
    pub const NONE: BodyLimits = BodyLimits {
        max_inputs: usize::MAX,
        max_text_chars: usize::MAX,
        max_image_bytes: usize::MAX,
    };

    pub fn from_server(s: &ServerConfig) -> Self {
        BodyLimits {
            max_inputs: s.max_inputs_per_request,
            max_text_chars: s.max_text_chars,
            max_image_bytes: s.max_image_bytes,
        }
    }
}

static PARSED_INPUTS: AtomicU64 = AtomicU64::new(0);

/// Inputs built by the body parsers since the process started. A request over
/// [`BodyLimits::max_inputs`] stops at the limit, which tests and the fuzz
/// harness check through this counter.
pub fn parsed_inputs() -> u64 {
    PARSED_INPUTS.load(Ordering::Relaxed)
}

/// What a parse needs besides the bytes: the limits, and the first failure
/// in the API's terms (status and message), kept beside serde's own error.
pub struct ParseCtx<'l> {
    pub limits: &'l BodyLimits,
    failure: RefCell<Option<ApiError>>,
}

impl<'l> ParseCtx<'l> {
    pub fn new(limits: &'l BodyLimits) -> Self {
        ParseCtx {
            limits,
            failure: RefCell::new(None),
        }
    }

    /// Records `e` (the first one wins) and returns a serde error that stops
    /// the parse.
    pub fn fail<E: de::Error>(&self, e: ApiError) -> E {
        let err = E::custom(&e.message);
        let mut slot = self.failure.borrow_mut();
        if slot.is_none() {
            *slot = Some(e);
        }
        err
    }

    /// The failure recorded by [`ParseCtx::fail`], if any.
    pub fn take_failure(&self) -> Option<ApiError> {
        self.failure.borrow_mut().take()
    }
}

/// An input with the name errors use for it (`inputs[2]`, `query`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labeled {
    pub label: String,
    pub input: RequestInput,
}

impl Labeled {
    pub fn new(label: impl Into<String>, input: RequestInput) -> Self {
        Labeled {
            label: label.into(),
            input,
        }
    }
}

/// A JSON value's type, for messages.
pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Implements every `visit_*` of a [`Visitor`] that is not a string, a map or
/// a sequence by calling `self.wrong_type(<type name>)`; with `null is none`,
/// a JSON `null` is `Ok(None)` instead (for optional fields).
macro_rules! scalars_are_wrong {
    () => {
        scalars_are_wrong!(@bools_and_numbers);
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Err(self.wrong_type("null"))
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Err(self.wrong_type("null"))
        }
    };
    (null is none) => {
        scalars_are_wrong!(@bools_and_numbers);
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    };
    (@bools_and_numbers) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Err(self.wrong_type("a boolean"))
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Err(self.wrong_type("a number"))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Err(self.wrong_type("a number"))
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Err(self.wrong_type("a number"))
        }
    };
}
pub(crate) use scalars_are_wrong;

/// A key of a JSON object: one of a fixed list, or another (as [`cut`] gives
/// it, for messages).
pub enum Key {
    Known(usize),
    Unknown(String),
}

/// Reads an object key against `known` without copying long keys.
pub struct KeySeed(pub &'static [&'static str]);

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Key;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Key, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Key;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
        Ok(match self.0.iter().position(|k| *k == v) {
            Some(i) => Key::Known(i),
            None => Key::Unknown(cut(v).into_owned()),
        })
    }
}

/// What an array (or a number) where one input is expected means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nested {
    /// An error naming the input.
    Plain,
    /// `/v1/embeddings`: OpenAI token id arrays, which are not supported.
    OpenAi,
    /// `/score`'s query, which is one input.
    Query,
}

/// Reads one input: a string (text) or an object with `text`, `image`,
/// `instruction` and `role`, found at `at` (`inputs[2]`).
#[derive(Clone, Copy)]
pub struct InputSeed<'c, 'l> {
    pub ctx: &'c ParseCtx<'l>,
    pub at: &'c str,
    pub nested: Nested,
}

const INPUT_KEYS: &[&str] = &["text", "image", "instruction", "role"];

impl<'de> DeserializeSeed<'de> for InputSeed<'_, '_> {
    type Value = RequestInput;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<RequestInput, D::Error> {
        d.deserialize_any(self)
    }
}

impl InputSeed<'_, '_> {
    fn wrong_type<E: de::Error>(&self, found: &str) -> E {
        let e = match (self.nested, found) {
            (Nested::OpenAi, "a number" | "an array") => ApiError::bad_request(
                "input: token id arrays are not supported; send strings or input objects",
            ),
            (Nested::Query, "an array") => ApiError::bad_request(
                "query: expected one input (a string or an object), found an array",
            ),
            _ => ApiError::bad_request(format!(
                "{}: expected a string or an object with \"text\" and/or \"image\", found {found}",
                self.at
            )),
        };
        self.ctx.fail(e)
    }
}

fn built(input: RequestInput) -> RequestInput {
    PARSED_INPUTS.fetch_add(1, Ordering::Relaxed);
    input
}

impl<'de> Visitor<'de> for InputSeed<'_, '_> {
    type Value = RequestInput;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string or an object with \"text\" and/or \"image\"")
    }

    scalars_are_wrong!();

    fn visit_str<E: de::Error>(self, v: &str) -> Result<RequestInput, E> {
        let text =
            check_text(self.ctx.limits, v, self.at, ".text").map_err(|e| self.ctx.fail(e))?;
        Ok(built(Input::text(text)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _seq: A) -> Result<RequestInput, A::Error> {
        Err(self.wrong_type("an array"))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RequestInput, A::Error> {
        let (ctx, at) = (self.ctx, self.at);
        let (mut text, mut image, mut instruction, mut role) = (None, None, None, Role::Candidate);
        let mut seen = [false; INPUT_KEYS.len()];
        while let Some(key) = map.next_key_seed(KeySeed(INPUT_KEYS))? {
            let i = match key {
                Key::Known(i) => i,
                Key::Unknown(k) => {
                    return Err(ctx.fail(ApiError::bad_request(format!(
                        "{at}: unknown field \"{k}\"; an input has \"text\", \"image\", \"instruction\" and \"role\""
                    ))))
                }
            };
            if std::mem::replace(&mut seen[i], true) {
                return Err(ctx.fail(ApiError::bad_request(format!(
                    "{at}: field \"{}\" is given more than once",
                    INPUT_KEYS[i]
                ))));
            }
            match i {
                0 => text = map.next_value_seed(StrSeed::text(ctx, at, ".text"))?,
                1 => image = map.next_value_seed(ImageSeed { ctx, at })?,
                2 => instruction = map.next_value_seed(StrSeed::text(ctx, at, ".instruction"))?,
                _ => {
                    if let Some(r) = map.next_value_seed(StrSeed::role(ctx, at))? {
                        role = r;
                    }
                }
            }
        }
        let Some(content) = Content::from_parts(text, image) else {
            return Err(ctx.fail(ApiError::unprocessable(format!(
                "{at}: empty input: give \"text\", \"image\" or both"
            ))));
        };
        let input = Input::new(content)
            .with_role(role)
            .with_instruction(instruction);
        Ok(built(input))
    }
}

/// Checks a text against the character limit and copies it out.
fn check_text(limits: &BodyLimits, s: &str, at: &str, field: &str) -> Result<String, ApiError> {
    let max = limits.max_text_chars;
    // A string has at most as many characters as bytes: most need no count.
    if s.len() > max {
        let n = s.chars().count();
        if n > max {
            return Err(ApiError::too_large(format!(
                "{at}{field}: the text is {n} characters long, over the limit of {max} \
                 characters (server.max_text_chars)"
            )));
        }
    }
    Ok(s.to_owned())
}

/// An input's optional string field (`text`, `instruction`, `role`): a
/// string, checked and converted by `parse`, or null.
struct StrSeed<'c, 'l, T> {
    ctx: &'c ParseCtx<'l>,
    at: &'c str,
    /// `.text`, `.role`, ...
    field: &'static str,
    /// What a string must be, for the `expecting` of serde's messages.
    expects: &'static str,
    /// Checks the string (`ctx`, value, `at`, `field`).
    parse: fn(&ParseCtx<'l>, &str, &str, &'static str) -> Result<T, ApiError>,
}

impl<'c, 'l> StrSeed<'c, 'l, String> {
    /// A text (`text`, `instruction`), checked against the character limit.
    fn text(ctx: &'c ParseCtx<'l>, at: &'c str, field: &'static str) -> Self {
        StrSeed {
            ctx,
            at,
            field,
            expects: "a string",
            parse: |ctx, v, at, field| check_text(ctx.limits, v, at, field),
        }
    }
}

impl<'c, 'l> StrSeed<'c, 'l, Role> {
    /// A role name.
    fn role(ctx: &'c ParseCtx<'l>, at: &'c str) -> Self {
        StrSeed {
            ctx,
            at,
            field: ".role",
            expects: "\"query\" or \"candidate\"",
            parse: |_, v, at, field| parse_role(v, &format!("{at}{field}")),
        }
    }
}

impl<'de, T> DeserializeSeed<'de> for StrSeed<'_, '_, T> {
    type Value = Option<T>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<T> StrSeed<'_, '_, T> {
    fn wrong_type<E: de::Error>(&self, found: &str) -> E {
        self.ctx.fail(ApiError::bad_request(format!(
            "{}{}: expected a string, found {found}",
            self.at, self.field
        )))
    }
}

impl<'de, T> Visitor<'de> for StrSeed<'_, '_, T> {
    type Value = Option<T>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.expects)
    }
    scalars_are_wrong!(null is none);
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        (self.parse)(self.ctx, v, self.at, self.field)
            .map(Some)
            .map_err(|e| self.ctx.fail(e))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Err(self.wrong_type("an array"))
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Err(self.wrong_type("an object"))
    }
}

/// An input's `image`: base64, a data URL, `{"url": ...}` (refused) or null.
struct ImageSeed<'c, 'l> {
    ctx: &'c ParseCtx<'l>,
    at: &'c str,
}

impl<'de> DeserializeSeed<'de> for ImageSeed<'_, '_> {
    type Value = Option<ImageSource>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl ImageSeed<'_, '_> {
    fn wrong_type<E: de::Error>(&self, found: &str) -> E {
        self.ctx.fail(ApiError::bad_request(format!(
            "{}.image: expected a base64 string, a data URL or {{\"url\": ...}}, found {found}",
            self.at
        )))
    }
}

impl ImageSeed<'_, '_> {
    /// An image URL, fetched or refused by the handler.
    fn url<E: de::Error>(&self, url: &str, at: &str) -> Result<Option<ImageSource>, E> {
        let url = url.trim();
        if url.is_empty() {
            return Err(self
                .ctx
                .fail(ApiError::unprocessable(format!("{at}: the URL is empty"))));
        }
        if url.len() > MAX_URL_BYTES {
            return Err(self.ctx.fail(ApiError::too_large(format!(
                "{at}: the URL is {} bytes long, over the limit of {MAX_URL_BYTES} bytes",
                url.len()
            ))));
        }
        Ok(Some(ImageSource::Url(url.to_string())))
    }
}

/// Longest image URL accepted, in bytes.
pub const MAX_URL_BYTES: usize = 8192;

/// Whether an image string is an `http://` or `https://` URL.
pub fn is_http_url(s: &str) -> bool {
    let s = s.trim_start();
    let start = s.get(..8).unwrap_or(s).to_ascii_lowercase();
    start.starts_with("http://") || start.starts_with("https:/")
}

impl<'de> Visitor<'de> for ImageSeed<'_, '_> {
    type Value = Option<ImageSource>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a base64 string, a data URL or {\"url\": ...}")
    }
    scalars_are_wrong!(null is none);
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        let at = format!("{}.image", self.at);
        if is_http_url(v) {
            return self.url(v, &at);
        }
        decode_image_string(v, &at, self.ctx.limits.max_image_bytes)
            .map(|b| Some(ImageSource::Bytes(b)))
            .map_err(|e| self.ctx.fail(e))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Err(self.wrong_type("an array"))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let at = format!("{}.image", self.at);
        let mut url: Option<Result<String, &'static str>> = None;
        while let Some(key) = map.next_key_seed(KeySeed(&["url"]))? {
            match key {
                Key::Known(_) if url.is_none() => url = Some(map.next_value_seed(UrlSeed)?),
                Key::Known(_) => {
                    return Err(self.ctx.fail(ApiError::bad_request(format!(
                        "{at}: field \"url\" is given more than once"
                    ))))
                }
                Key::Unknown(k) => {
                    return Err(self.ctx.fail(ApiError::bad_request(format!(
                        "{at}: unknown field \"{k}\"; an image object is {{\"url\": \"...\"}}"
                    ))))
                }
            }
        }
        let e = match url {
            Some(Ok(u)) => return self.url(&u, &format!("{at}.url")),
            Some(Err(found)) => {
                ApiError::bad_request(format!("{at}.url: expected a string, found {found}"))
            }
            None => ApiError::bad_request(format!("{at}: an image object needs \"url\"")),
        };
        Err(self.ctx.fail(e))
    }
}

/// An image object's `url`: the string, or the type found instead.
struct UrlSeed;

impl<'de> DeserializeSeed<'de> for UrlSeed {
    type Value = Result<String, &'static str>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for UrlSeed {
    type Value = Result<String, &'static str>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a URL")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Err("a boolean"))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Err("a number"))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Err("a number"))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Err("a number"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Err("null"))
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Err("null"))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        // Bounded by the body size; checked against MAX_URL_BYTES by the caller.
        Ok(Ok(v.to_string()))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Err("an array"))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Err("an object"))
    }
}

/// Where a list of inputs may also be one input, and what else it may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListShape {
    /// `<input> | [<input>, ...]` (`/embed` inputs).
    OneOrMany,
    /// `/v1/embeddings` input: like `OneOrMany`, with OpenAI's messages.
    OpenAi,
    /// An array only (`/score` candidates).
    ArrayOnly,
}

/// Reads a list of inputs found at `field`, stopping at the first one past
/// `max` (413) without reading it.
pub struct ListSeed<'c, 'l> {
    pub ctx: &'c ParseCtx<'l>,
    pub field: &'c str,
    pub shape: ListShape,
    /// Most items in this list.
    pub max: usize,
    /// What an item is called in the limit's message ("inputs", "candidates").
    pub noun: &'static str,
}

impl<'de> DeserializeSeed<'de> for ListSeed<'_, '_> {
    type Value = Vec<Labeled>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Vec<Labeled>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'c, 'l> ListSeed<'c, 'l> {
    /// The list found at `field`. A `/score` candidates list
    /// ([`ListShape::ArrayOnly`]) leaves one input of the request's limit
    /// to the query.
    pub fn new(ctx: &'c ParseCtx<'l>, field: &'c str, shape: ListShape) -> Self {
        let (max, noun) = match shape {
            ListShape::ArrayOnly => (ctx.limits.max_inputs.saturating_sub(1), "candidates"),
            ListShape::OneOrMany | ListShape::OpenAi => (ctx.limits.max_inputs, "inputs"),
        };
        ListSeed {
            ctx,
            field,
            shape,
            max,
            noun,
        }
    }

    fn single(&self) -> InputSeed<'c, 'l> {
        InputSeed {
            ctx: self.ctx,
            at: self.field,
            nested: Nested::Plain,
        }
    }

    fn one(&self, input: RequestInput) -> Vec<Labeled> {
        vec![Labeled::new(self.field, input)]
    }

    fn wrong_type<E: de::Error>(&self, found: &str) -> E {
        let field = self.field;
        match self.shape {
            ListShape::OneOrMany => self.single().wrong_type(found),
            ListShape::OpenAi => self.ctx.fail(ApiError::bad_request(format!(
                "{field}: expected a string or an array of strings or inputs, found {found}"
            ))),
            ListShape::ArrayOnly => self.ctx.fail(ApiError::bad_request(format!(
                "{field}: expected an array of inputs, found {found}"
            ))),
        }
    }
}

impl<'de> Visitor<'de> for ListSeed<'_, '_> {
    type Value = Vec<Labeled>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an input or an array of inputs")
    }

    scalars_are_wrong!();

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<Labeled>, E> {
        if self.shape == ListShape::ArrayOnly {
            return Err(self.wrong_type("a string"));
        }
        self.single().visit_str(v).map(|i| self.one(i))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Vec<Labeled>, A::Error> {
        if self.shape == ListShape::ArrayOnly {
            return Err(self.wrong_type("an object"));
        }
        self.single().visit_map(map).map(|i| self.one(i))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Labeled>, A::Error> {
        let nested = match self.shape {
            ListShape::OpenAi => Nested::OpenAi,
            _ => Nested::Plain,
        };
        let mut out = Vec::new();
        loop {
            if out.len() >= self.max {
                // One more item, skipped without being built, is one too many.
                if seq.next_element::<IgnoredAny>()?.is_some() {
                    return Err(self.ctx.fail(ApiError::too_large(format!(
                        "{}: more than {} {}, over the limit of {} inputs per request \
                         (server.max_inputs_per_request)",
                        self.field, self.max, self.noun, self.ctx.limits.max_inputs
                    ))));
                }
                break;
            }
            let at = format!("{}[{}]", self.field, out.len());
            let seed = InputSeed {
                ctx: self.ctx,
                at: &at,
                nested,
            };
            match seq.next_element_seed(seed)? {
                Some(input) => out.push(Labeled::new(at, input)),
                None => break,
            }
        }
        Ok(out)
    }
}

/// Parses a role name (`query` or `candidate`).
pub fn parse_role(s: &str, at: &str) -> Result<Role, ApiError> {
    s.parse::<Role>().map_err(|_| {
        ApiError::bad_request(format!(
            "{at}: unknown role {}: expected \"query\" or \"candidate\"",
            quote(s)
        ))
    })
}

/// The message for an image URL when URL fetching is off.
pub fn url_refused(at: &str) -> ApiError {
    ApiError::unprocessable(format!(
        "{at}: image URLs are not fetched (URL fetching is disabled: server.fetch_image_urls \
         is false); send the image inline as base64, a data URL, or a multipart file"
    ))
}

/// Decodes an image given as base64 or as a `data:...;base64,` URL, refusing
/// (413) one over `max_bytes` before decoding it.
pub fn decode_image_string(s: &str, at: &str, max_bytes: usize) -> Result<Vec<u8>, ApiError> {
    let s = s.trim();
    if is_http_url(s) {
        return Err(url_refused(at));
    }
    let lower_start = s.get(..8).unwrap_or(s).to_ascii_lowercase();
    let payload = if lower_start.starts_with("data:") {
        let Some((meta, data)) = s.split_once(',') else {
            return Err(ApiError::unprocessable(format!(
                "{at}: malformed data URL: no ',' before the data"
            )));
        };
        if !meta.to_ascii_lowercase().ends_with(";base64") {
            return Err(ApiError::unprocessable(format!(
                "{at}: data URLs must be base64-encoded, like data:image/png;base64,..."
            )));
        }
        data
    } else {
        s
    };
    if payload.is_empty() {
        return Err(ApiError::unprocessable(format!("{at}: the image is empty")));
    }
    let too_large = |bytes: usize, about: &str| {
        ApiError::too_large(format!(
            "{at}: the image is {about}{bytes} bytes, over the limit of {max_bytes} bytes \
             (server.max_image_bytes)"
        ))
    };
    // Every 4 base64 characters (whitespace aside) give 3 bytes, padding
    // included: this bounds the decoded size from above by at most 2 bytes.
    let chars = payload.bytes().filter(|b| !b.is_ascii_whitespace()).count();
    let estimate = chars / 4 * 3 + (chars % 4).saturating_sub(1);
    if estimate > max_bytes.saturating_add(2) {
        return Err(too_large(estimate, "about "));
    }
    let bytes = decode_base64(payload)
        .map_err(|e| ApiError::unprocessable(format!("{at}: not valid base64 ({e})")))?;
    if bytes.len() > max_bytes {
        return Err(too_large(bytes.len(), ""));
    }
    Ok(bytes)
}

fn decode_base64(payload: &str) -> Result<Vec<u8>, base64::DecodeError> {
    let cleaned;
    let data = if payload.bytes().any(|b| b.is_ascii_whitespace()) {
        cleaned = payload
            .bytes()
            .filter(|b| !b.is_ascii_whitespace())
            .collect::<Vec<u8>>();
        cleaned.as_slice()
    } else {
        payload.as_bytes()
    };
    match STANDARD_LENIENT.decode(data) {
        Ok(bytes) => Ok(bytes),
        Err(e) => URL_SAFE_LENIENT.decode(data).map_err(|_| e),
    }
}

/// Encodes an embedding as base64 of its little-endian f32 bytes.
pub fn encode_embedding(v: &[f32]) -> String {
    let mut bytes = Vec::with_capacity(v.len() * 4);
    for x in v {
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests;
