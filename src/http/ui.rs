//! The browser pages: the playground at `/` and the API docs at `/docs`.
//!
//! Owns the two pages, assembled at build time from `assets/` (HTML, CSS and
//! JavaScript inlined into one document each, so the binary needs no files
//! and the browser fetches nothing but this server's API). The pages call the
//! public API like any client; nothing here embeds or knows of models.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

macro_rules! page {
    ($title:literal, $css:literal, $body:literal, $js:literal) => {
        concat!(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
            "<title>",
            $title,
            "</title><style>\n",
            include_str!("../../assets/common.css"),
            include_str!($css),
            "</style></head><body>\n",
            include_str!($body),
            "<script>\n",
            include_str!($js),
            "</script></body></html>\n"
        )
    };
}

/// The playground page.
pub const PLAYGROUND: &str = page!(
    "vlembed playground",
    "../../assets/playground.css",
    "../../assets/playground.html",
    "../../assets/playground.js"
);

/// The API documentation page (renders `/openapi.json` in the browser).
pub const DOCS: &str = page!(
    "vlembed API docs",
    "../../assets/docs.css",
    "../../assets/docs.html",
    "../../assets/docs.js"
);

/// The pages load nothing from elsewhere: inline code and styles, images
/// from `data:` URLs, requests to this server only.
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                   img-src data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

fn html(page: &'static str) -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        page,
    )
        .into_response()
}

/// `GET /`.
pub async fn playground() -> Response {
    html(PLAYGROUND)
}

/// `GET /docs`.
pub async fn docs() -> Response {
    html(DOCS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_self_contained() {
        for page in [PLAYGROUND, DOCS] {
            assert!(page.starts_with("<!doctype html>"));
            // Nothing loaded from another origin (no CDN, no fonts).
            for needle in [
                "src=\"http",
                "href=\"http",
                "src=\"//",
                "href=\"//",
                "@import",
                "url(",
            ] {
                assert!(!page.contains(needle), "{needle} in a page");
            }
        }
        assert!(PLAYGROUND.contains("id=\"results\"") && PLAYGROUND.contains("fetch(path"));
        assert!(DOCS.contains("/openapi.json"));
    }
}
