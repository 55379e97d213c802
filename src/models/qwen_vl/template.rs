//! A model's chat template (`chat_template.json` or `tokenizer_config.json`),
//! rendered the way transformers renders it.
//!
//! Owns [`ChatTemplate`]: one compiled template in a minijinja environment set
//! up like transformers' (`trim_blocks` and `lstrip_blocks` on, loop controls,
//! `tojson`, Python string methods through minijinja-contrib's pycompat,
//! `raise_exception`, the tokenizer's special tokens as variables), rendered
//! with `add_generation_prompt=True`. A render is bounded twice while it runs:
//! minijinja's fuel limits the instructions it may execute, and the output
//! is written into a buffer that refuses to grow past [`MAX_RENDERED_BYTES`]
//! (the render stops there). A template is model configuration, not client
//! input, but a template with a runaway loop must not hang a request.
//!
//! Why minijinja and not string pasting: the prompt is whatever the model's
//! own template makes of the messages (its default system message, its
//! image markup), so a model with another template gets its own prompt.

use std::io::Write;

use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;

/// The most bytes a rendered prompt may have. Inputs are bounded before
/// (texts by the HTTP layer); this catches templates that multiply them.
pub const MAX_RENDERED_BYTES: usize = 4 << 20;
/// Instructions one render may execute (a few thousand for Qwen's template).
const FUEL: u64 = 2_000_000;

/// One message: a role and either a string or a list of typed parts.
#[derive(Debug, Clone, Serialize)]
pub struct Message {
    pub role: &'static str,
    pub content: Content,
}

/// A message's content, as transformers' processors accept it.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// One part of a message's content.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Part {
    Image,
    Text { text: String },
}

/// Why a render failed.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The template failed (or its `raise_exception` refused the messages).
    #[error("the chat template failed: {0}")]
    Template(#[source] minijinja::Error),
    /// The output reached [`MAX_RENDERED_BYTES`]; the render was stopped.
    #[error("the rendered prompt would be over {MAX_RENDERED_BYTES} bytes")]
    TooLarge,
}

/// A compiled chat template.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    /// `bos_token`, `eos_token`, ... from the tokenizer's configuration.
    specials: Vec<(String, String)>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bytes", &self.source.len())
            .finish_non_exhaustive()
    }
}

fn raise_exception(msg: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// A buffer that refuses to grow past a limit: the render writing into it
/// fails at the write that would cross it.
struct Bounded {
    out: Vec<u8>,
    limit: usize,
    full: bool,
}

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + buf.len() > self.limit {
            self.full = true;
            return Err(std::io::Error::other("the rendered prompt is too large"));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ChatTemplate {
    /// Compiles `source`; `specials` are the variables transformers passes
    /// beside the messages (`bos_token`, `eos_token`, `pad_token`, `unk_token`).
    pub fn new(source: String, specials: Vec<(String, String)>) -> Result<Self, minijinja::Error> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()?;
        env.set_syntax(syntax);
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", source.clone())?;
        Ok(ChatTemplate {
            env,
            source,
            specials,
        })
    }

    /// The template's text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The special-token variables it is rendered with.
    pub fn specials(&self) -> &[(String, String)] {
        &self.specials
    }

    /// Renders `messages` with `add_generation_prompt=True`.
    pub fn render(&self, messages: &[Message]) -> Result<String, RenderError> {
        self.render_bounded(messages, MAX_RENDERED_BYTES)
    }

    fn render_bounded(&self, messages: &[Message], limit: usize) -> Result<String, RenderError> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(RenderError::Template)?;
        let mut ctx: Vec<(String, Value)> = self
            .specials
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        ctx.push((
            "messages".into(),
            Value::from(minijinja::value::Serde(messages)),
        ));
        ctx.push(("add_generation_prompt".into(), Value::from(true)));
        let mut out = Bounded {
            out: Vec::new(),
            limit,
            full: false,
        };
        let rendered = tmpl.render_captured_to(Value::from_pairs(ctx), &mut out);
        if out.full {
            return Err(RenderError::TooLarge);
        }
        rendered.map_err(RenderError::Template)?;
        // minijinja writes whole UTF-8 strings, and the limit cuts at a
        // write: what is kept is valid UTF-8.
        String::from_utf8(out.out).map_err(|e| {
            RenderError::Template(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                e.to_string(),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen2-VL-2B-Instruct's template (the fixtures' too).
    pub(crate) const QWEN2_VL: &str = "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    fn user(parts: Vec<Part>) -> Message {
        Message {
            role: "user",
            content: Content::Parts(parts),
        }
    }

    #[test]
    fn renders_qwens_template_like_transformers() {
        let t = ChatTemplate::new(QWEN2_VL.into(), vec![]).unwrap();
        let out = t
            .render(&[user(vec![
                Part::Image,
                Part::Text {
                    text: "a cat".into(),
                },
            ])])
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>a cat<|im_end|>\n<|im_start|>assistant\n"
        );
        let sys = Message {
            role: "system",
            content: Content::Text("Find it.".into()),
        };
        let out = t
            .render(&[sys, user(vec![Part::Text { text: "x".into() }])])
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nFind it.<|im_end|>\n<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn hf_features_and_bounds() {
        // trim_blocks / lstrip_blocks, loop controls, tojson, Python string
        // methods, the special-token variables and raise_exception.
        let src = "{% for m in messages %}\n  {% if m.role.startswith('sys') %}{% continue %}{% endif %}\n{{ bos_token }}{{ m.content | tojson }}{{ m.content.strip() }}\n{% endfor %}{% if messages | length > 2 %}{{ raise_exception('too many') }}{% endif %}";
        let t = ChatTemplate::new(src.into(), vec![("bos_token".into(), "<s>".into())]).unwrap();
        let m = |role, c: &str| Message {
            role,
            content: Content::Text(c.into()),
        };
        assert_eq!(
            t.render(&[m("system", "s"), m("user", " hi ")]).unwrap(),
            "<s>\" hi \"hi\n"
        );
        let err = t
            .render(&[m("user", "a"), m("user", "b"), m("user", "c")])
            .unwrap_err();
        assert!(err.to_string().contains("too many"), "{err}");
        // A runaway template runs out of fuel instead of hanging.
        let t = ChatTemplate::new(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
                .into(),
            vec![],
        )
        .unwrap();
        assert!(t.render(&[]).is_err());
        assert!(ChatTemplate::new("{% if %}".into(), vec![]).is_err());
    }

    #[test]
    fn a_render_stops_at_the_byte_limit() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ m.content }}{{ m.content }}{% endfor %}".into(),
            vec![],
        )
        .unwrap();
        let m = |c: &str| Message {
            role: "user",
            content: Content::Text(c.into()),
        };
        assert_eq!(t.render_bounded(&[m("abc")], 6).unwrap(), "abcabc");
        assert!(matches!(
            t.render_bounded(&[m("abcd")], 6),
            Err(RenderError::TooLarge)
        ));
        // A template that raises is a template failure, not a size.
        let t = ChatTemplate::new("{{ raise_exception('no') }}".into(), vec![]).unwrap();
        assert!(matches!(t.render(&[]), Err(RenderError::Template(_))));
    }
}
