//! `POST /score`: a query and its candidates, from JSON or multipart.

use serde::de::{self, MapAccess};

use super::super::body::{decode_seed, part_text, JsonBody, Part};
use super::super::error::{quote, ApiError};
use super::super::inputs::{BodyLimits, Labeled, ParseCtx};
use super::super::inputs::{InputSeed, ListSeed, ListShape, Nested};
use super::fields::{missing, opt_priority, opt_string, opt_usize, Fields, Top};
use super::{pair, parse_priority, read_parts, PartNames};
use crate::batching::Class;
use crate::input::{Content, ImageSource, Input, RequestInput, Role};

/// The multipart fields of `/score`; the candidates' may repeat.
const SCORE_PARTS: PartNames = PartNames {
    known: &[
        "model",
        "query_text",
        "query_image",
        "instruction",
        "candidate_text",
        "candidate_image",
        "top_k",
        "priority",
    ],
    repeatable: &["candidate_text", "candidate_image"],
};

/// `POST /score`.
#[derive(Debug)]
pub struct ScoreRequest {
    pub model: Option<String>,
    /// The query first, then the candidates.
    pub inputs: Vec<Labeled>,
    pub top_k: Option<usize>,
    /// `priority`: the scheduling class; `None`: chosen from the inputs.
    pub priority: Option<Class>,
}

impl ScoreRequest {
    /// Reads a JSON body under its limits.
    pub fn from_json(body: &JsonBody) -> Result<Self, ApiError> {
        Self::from_json_with(&body.bytes, &body.limits)
    }

    pub fn from_json_with(bytes: &[u8], limits: &BodyLimits) -> Result<Self, ApiError> {
        let ctx = ParseCtx::new(limits);
        decode_seed(bytes, &ctx, Top(ScoreFields::new(&ctx)))
    }

    pub fn from_multipart(parts: Vec<Part>) -> Result<Self, ApiError> {
        let mut model = None;
        let mut query_text = None;
        let mut query_image = None;
        let mut instruction = None;
        let mut top_k = None;
        let mut priority = None;
        let mut texts = Vec::new();
        let mut images = Vec::new();
        read_parts(parts, &SCORE_PARTS, |name, part| {
            match name {
                "model" => model = Some(part_text(&part)?),
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
                "priority" => priority = Some(parse_priority(&part_text(&part)?)?),
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
            model,
            inputs,
            top_k,
            priority,
        })
    }
}

/// `/score`'s fields as they are read.
struct ScoreFields<'c, 'l> {
    ctx: &'c ParseCtx<'l>,
    model: Option<String>,
    query: Option<RequestInput>,
    candidates: Option<Vec<Labeled>>,
    top_k: Option<usize>,
    priority: Option<Class>,
}

impl<'c, 'l> ScoreFields<'c, 'l> {
    fn new(ctx: &'c ParseCtx<'l>) -> Self {
        ScoreFields {
            ctx,
            model: None,
            query: None,
            candidates: None,
            top_k: None,
            priority: None,
        }
    }
}

impl<'de> Fields<'de> for ScoreFields<'_, '_> {
    type Out = ScoreRequest;
    const NAMES: &'static [&'static str] = &["model", "query", "candidates", "top_k", "priority"];
    fn ctx(&self) -> &ParseCtx<'_> {
        self.ctx
    }
    fn field<A: MapAccess<'de>>(&mut self, i: usize, map: &mut A) -> Result<(), A::Error> {
        let ctx = self.ctx;
        match i {
            0 => self.model = opt_string(ctx, map, "model")?,
            1 => {
                self.query = Some(map.next_value_seed(InputSeed {
                    ctx,
                    at: "query",
                    nested: Nested::Query,
                })?)
            }
            2 => {
                // The query is one of the request's inputs.
                let max = ctx.limits.max_inputs.saturating_sub(1);
                self.candidates = Some(map.next_value_seed(ListSeed {
                    ctx,
                    field: "candidates",
                    shape: ListShape::ArrayOnly,
                    max,
                    noun: "candidates",
                })?)
            }
            3 => self.top_k = opt_usize(ctx, map, "top_k")?,
            _ => self.priority = opt_priority(ctx, map)?,
        }
        Ok(())
    }
    fn finish<E: de::Error>(self) -> Result<ScoreRequest, E> {
        let mut query = self.query.ok_or_else(|| missing(self.ctx, "query"))?;
        let candidates = self
            .candidates
            .ok_or_else(|| missing(self.ctx, "candidates"))?;
        query.role = Role::Query;
        let mut inputs = vec![Labeled::new("query", query)];
        inputs.extend(candidates.into_iter().map(|mut c| {
            c.input.role = Role::Candidate;
            c
        }));
        Ok(ScoreRequest {
            model: self.model,
            inputs,
            top_k: self.top_k,
            priority: self.priority,
        })
    }
}
