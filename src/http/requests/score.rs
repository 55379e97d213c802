//! `POST /score`: a query and its candidates, from JSON or multipart.

use serde::de::{self, MapAccess};

use super::super::body::{part_text, Part};
use super::super::error::{quote, ApiError};
use super::super::inputs::{BodyLimits, InputSeed, Labeled, ListSeed, ListShape, Nested, ParseCtx};
use super::fields::{missing, opt_usize, read_json, FieldAt, Fields};
use super::{pair, read_parts, Common, EndpointRequest, PartNames};
use crate::input::{Content, ImageSource, Input, RequestInput, Role};

/// The multipart fields of `/score` besides the common ones; the
/// candidates' may repeat.
const SCORE_PARTS: PartNames = PartNames {
    known: &[
        "query_text",
        "query_image",
        "instruction",
        "candidate_text",
        "candidate_image",
        "top_k",
    ],
    repeatable: &["candidate_text", "candidate_image"],
};

/// `POST /score`.
#[derive(Debug)]
pub struct ScoreRequest {
    /// `model` and `priority`.
    pub common: Common,
    /// The query first, then the candidates.
    pub inputs: Vec<Labeled>,
    pub top_k: Option<usize>,
}

impl EndpointRequest for ScoreRequest {
    fn from_json_with(bytes: &[u8], limits: &BodyLimits) -> Result<Self, ApiError> {
        read_json::<ScoreFields>(bytes, limits)
    }

    fn from_multipart(parts: Vec<Part>) -> Result<Self, ApiError> {
        let mut query_text = None;
        let mut query_image = None;
        let mut instruction = None;
        let mut top_k = None;
        let mut texts = Vec::new();
        let mut images = Vec::new();
        let common = read_parts(parts, &SCORE_PARTS, |name, part| {
            match name {
                "query_text" => query_text = Some(part_text(&part)?),
                "query_image" => query_image = Some(ImageSource::Bytes(part.data.to_vec())),
                "instruction" => instruction = Some(part_text(&part)?),
                "top_k" => {
                    let t = part_text(&part)?;
                    top_k = Some(t.trim().parse::<usize>().map_err(|_| {
                        ApiError::bad_request(format!(
                            "multipart field \"top_k\": expected a non-negative integer, found {}",
                            quote(&t)
                        ))
                    })?)
                }
                "candidate_text" => texts.push(part_text(&part)?),
                _ => images.push(part.data.to_vec()),
            }
            Ok(())
        })?;
        let Some(query) = Content::from_parts(query_text, query_image) else {
            return Err(ApiError::unprocessable(
                "query: empty input: give a query_text field, a query_image part or both",
            ));
        };
        let query = Input::new(query)
            .with_role(Role::Query)
            .with_instruction(instruction);
        let mut inputs = vec![Labeled::new("query", query)];
        let candidates = pair(texts, images, "candidate_text", "candidate_image")?;
        for (i, c) in candidates.into_iter().enumerate() {
            inputs.push(Labeled::new(format!("candidates[{i}]"), Input::new(c)));
        }
        Ok(ScoreRequest {
            common,
            inputs,
            top_k,
        })
    }
}

/// `/score`'s own fields as they are read.
#[derive(Default)]
struct ScoreFields {
    query: Option<RequestInput>,
    candidates: Option<Vec<Labeled>>,
    top_k: Option<usize>,
}

impl Fields for ScoreFields {
    type Out = ScoreRequest;
    const NAMES: &'static [&'static str] = &["query", "candidates", "top_k"];
    fn field<'de, A: MapAccess<'de>>(&mut self, f: FieldAt<'_, '_, A>) -> Result<(), A::Error> {
        let FieldAt { ctx, name, map } = f;
        match name {
            "query" => {
                let nested = Nested::Query;
                let seed = InputSeed {
                    ctx,
                    at: name,
                    nested,
                };
                self.query = Some(map.next_value_seed(seed)?);
            }
            // The query is one of the request's inputs: the list's limit
            // leaves it room.
            "candidates" => {
                let list = ListSeed::new(ctx, name, ListShape::ArrayOnly);
                self.candidates = Some(map.next_value_seed(list)?);
            }
            _ => self.top_k = opt_usize(ctx, map, name)?,
        }
        Ok(())
    }
    fn finish<E: de::Error>(self, ctx: &ParseCtx<'_>, common: Common) -> Result<ScoreRequest, E> {
        let mut query = self.query.ok_or_else(|| missing(ctx, "query"))?;
        let candidates = self.candidates.ok_or_else(|| missing(ctx, "candidates"))?;
        query.role = Role::Query;
        let mut inputs = vec![Labeled::new("query", query)];
        inputs.extend(candidates.into_iter().map(|mut c| {
            c.input.role = Role::Candidate;
            c
        }));
        Ok(ScoreRequest {
            common,
            inputs,
            top_k: self.top_k,
        })
    }
}
