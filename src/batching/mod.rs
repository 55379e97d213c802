//! Dynamic batching: from a request's inputs to its embeddings, in order.
//!
//! Owns the per-model [`Batcher`]: the request's image decode budget (checked
//! from the images' headers before anything else), admission into the
//! bounded [`Queue`] (429 instead of growing), preprocessing in a bounded blocking pool (it overlaps
//! the workers' forward passes), turning each input into a queue [`Item`]
//! with a deadline, re-assembling the workers' answers in order, and
//! normalisation. Dropping a request's future cancels its items: they are
//! skipped before inference. With the model's [`EmbeddingCache`] on, an input
//! whose preprocessed form was embedded before is answered from the cache
//! and never enqueued. It knows nothing of HTTP and never touches a
//! tensor or a model replica (that is [`crate::worker`]).

pub mod cache;
pub mod queue;
pub mod schedule;
#[cfg(test)]
pub(crate) mod test_support;
pub mod trace;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Semaphore};

use crate::input::{Content, Input, Modality};
use crate::metrics::Metrics;
use crate::preprocess::{Prepared, PreprocessError, Preprocessor, RequestImagesError};
use crate::vector::l2_normalize;
pub use cache::{CacheKey, EmbeddingCache};
pub use queue::{Admission, AdmitError, Item, ItemError, ItemResult, Queue, WorkerId, WorkerState};
pub use schedule::{Class, Ran, PRIORITY_BURST};
pub use trace::RequestTrace;

/// How a request wants its inputs handled.
#[derive(Debug, Clone, Default)]
pub struct EmbedOptions {
    /// L2-normalise each embedding.
    pub normalize: bool,
    /// Clip texts over the model's token limit instead of refusing them.
    pub truncate: bool,
    /// The request's id and timings, carried by its queue items (logs, access log).
    pub trace: Option<Arc<RequestTrace>>,
    /// The request's scheduling class; `None`: [`Class::auto`] decides.
    pub priority: Option<Class>,
}

impl EmbedOptions {
    /// Options with no trace.
    pub fn new(normalize: bool, truncate: bool, priority: Option<Class>) -> Self {
        EmbedOptions {
            normalize,
            truncate,
            priority,
            trace: None,
        }
    }
}

/// A request's embeddings, in input order, with what it used.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedded {
    pub embeddings: Vec<Vec<f32>>,
    /// Text tokens over every input (special tokens included).
    pub text_tokens: usize,
    /// Inputs that carried an image.
    pub images: usize,
}

/// Why a request got no embeddings.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error(transparent)]
    Admit(#[from] AdmitError),
    #[error("input {index}: {source}")]
    Input {
        index: usize,
        #[source]
        source: PreprocessError,
    },
    /// The request's images declare more pixels in all than the model's
    /// per-request decode budget; found from their headers, nothing decoded.
    #[error(
        "the request's images declare at least {pixels} pixels in all (the first {images} of them), over the per-request budget of {limit} pixels"
    )]
    ImageBudget {
        /// Images counted when the budget ran out.
        images: usize,
        /// Pixels those images declare.
        pixels: u64,
        /// The budget.
        limit: u64,
    },
    /// The model failed on this input (alone, after its batch was split).
    #[error("input {index}: {source}")]
    Failed {
        index: usize,
        #[source]
        source: ItemError,
    },
    #[error("{0}")]
    Item(ItemError),
    #[error("the request did not finish within {0:?}")]
    Timeout(Duration),
    #[error("internal error: {0}")]
    Internal(String),
}

/// Texts alone up to this many bytes (text and instruction) are tokenised
/// on the request's own task: tens of microseconds, less than a hand-off to
/// the blocking pool and back (two thread wake-ups) costs.
pub const INLINE_TEXT_BYTES: usize = 1024;

/// Whether `input` is tokenised inline (see [`INLINE_TEXT_BYTES`]).
fn inline(input: &Input) -> bool {
    match &input.content {
        Content::Text(t) => {
            t.len() + input.instruction.as_ref().map_or(0, String::len) <= INLINE_TEXT_BYTES
        }
        Content::Image(_) | Content::Composed { .. } => false,
    }
}

/// A preprocessing job: done inline, or running on the blocking pool.
enum Job {
    Done(JobResult),
    Spawned(tokio::task::JoinHandle<JobResult>),
}

/// A prepared input and its cache key (when the model has a cache), or the
/// error (`None`: skipped because the request stopped).
type JobResult = Result<(Prepared, Option<CacheKey>), Option<PreprocessError>>;

/// `p` with its cache key, when there is a cache.
fn with_key(
    cache: Option<&EmbeddingCache>,
    p: Prepared,
    input: &Input,
) -> (Prepared, Option<CacheKey>) {
    let key = cache.map(|c| c.key(&p, input.role, input.instruction.as_deref()));
    (p, key)
}

/// Bounds how many inputs are preprocessed at once, over every model.
#[derive(Debug, Clone)]
pub struct PreprocessPool {
    permits: Arc<Semaphore>,
}

impl PreprocessPool {
    pub fn new(concurrency: usize) -> Self {
        PreprocessPool {
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
        }
    }
}

/// Sets a flag when dropped: tells queued preprocessing jobs that their
/// request went away.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The request-facing side of one model: preprocess, queue, await.
pub struct Batcher {
    model: String,
    queue: Arc<Queue>,
    preprocessor: Arc<dyn Preprocessor>,
    pool: PreprocessPool,
    metrics: Metrics,
    /// The model's embedding cache, when on.
    cache: Option<Arc<EmbeddingCache>>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl Batcher {
    pub fn new(
        queue: Arc<Queue>,
        preprocessor: Arc<dyn Preprocessor>,
        pool: PreprocessPool,
        metrics: Metrics,
    ) -> Self {
        Batcher {
            model: queue.model().to_string(),
            queue,
            preprocessor,
            pool,
            metrics,
            cache: None,
        }
    }

    /// Answers inputs embedded before from `cache` (`None`: no cache).
    pub fn with_cache(mut self, cache: Option<Arc<EmbeddingCache>>) -> Self {
        self.cache = cache;
        self
    }

    pub fn queue(&self) -> &Arc<Queue> {
        &self.queue
    }

    /// The model's embedding cache, when on.
    pub fn cache(&self) -> Option<&Arc<EmbeddingCache>> {
        self.cache.as_ref()
    }

    /// Embeds `inputs` (in order), giving up `timeout` after `started`
    /// (when the request arrived).
    pub async fn embed(
        &self,
        inputs: Vec<Input>,
        opts: EmbedOptions,
        started: Instant,
        timeout: Duration,
    ) -> Result<Embedded, EmbedError> {
        let deadline = started + timeout;
        let budget = timeout;
        let run = self.run(inputs, opts, deadline, budget);
        match tokio::time::timeout_at(deadline.into(), run).await {
            Ok(r) => r,
            Err(_) => Err(EmbedError::Timeout(budget)),
        }
    }

    async fn run(
        &self,
        inputs: Vec<Input>,
        opts: EmbedOptions,
        deadline: Instant,
        budget: Duration,
    ) -> Result<Embedded, EmbedError> {
        self.check_images(&inputs)?;
        let class = opts.priority.unwrap_or_else(|| Class::auto(&inputs));
        let mut admission = self.queue.admit_class(inputs.len(), class)?;
        let prep_start = Instant::now();
        let prepared = self.prepare_all(inputs, opts.truncate).await?;
        if let Some(t) = &opts.trace {
            t.add_preprocess(prep_start.elapsed());
        }
        let text_tokens = prepared.iter().map(|(p, _)| p.text_tokens).sum();
        let images = prepared
            .iter()
            .filter(|(p, _)| p.modality.has_image())
            .count();
        let modalities: Vec<Modality> = prepared.iter().map(|(p, _)| p.modality).collect();
        // Each input's answer: from the cache now, or from a worker later
        // (then stored under its key).
        enum Answer {
            Cached(Vec<f32>),
            Pending(oneshot::Receiver<ItemResult>, Option<CacheKey>),
        }
        let mut answers = Vec::with_capacity(prepared.len());
        let mut items = Vec::with_capacity(prepared.len());
        for (p, key) in prepared {
            let hit = match (&self.cache, &key) {
                (Some(cache), Some(k)) => cache.get(k),
                _ => None,
            };
            match hit {
                Some(v) => answers.push(Answer::Cached(v)),
                None => {
                    let (mut item, rx) = Item::new(p, deadline);
                    item.trace.clone_from(&opts.trace);
                    answers.push(Answer::Pending(rx, key));
                    items.push(item);
                }
            }
        }
        let cached = answers.len() - items.len();
        if let Some(t) = &opts.trace {
            t.add_cached(cached);
        }
        if !items.is_empty() {
            admission.push(items)?;
        }
        // `admission` lives until the answers are in: if this future is
        // dropped (client gone, timeout), its queued inputs are withdrawn and
        // its capacity released at once.
        let mut embeddings = Vec::with_capacity(answers.len());
        for (index, answer) in answers.into_iter().enumerate() {
            let (rx, key) = match answer {
                Answer::Cached(mut v) => {
                    if opts.normalize {
                        l2_normalize(&mut v);
                    }
                    embeddings.push(v);
                    continue;
                }
                Answer::Pending(rx, key) => (rx, key),
            };
            let mut v = match rx.await {
                Ok(Ok(v)) => v,
                Ok(Err(ItemError::Expired)) => return Err(EmbedError::Timeout(budget)),
                Ok(Err(source @ ItemError::BatchFailed(_))) => {
                    return Err(EmbedError::Failed { index, source })
                }
                Ok(Err(e)) => return Err(EmbedError::Item(e)),
                Err(_) => {
                    return Err(EmbedError::Item(ItemError::WorkerDied(
                        "the input was dropped without an answer".into(),
                    )))
                }
            };
            if let (Some(cache), Some(k)) = (&self.cache, key) {
                cache.insert(k, v.clone());
            }
            if opts.normalize {
                l2_normalize(&mut v);
            }
            embeddings.push(v);
        }
        for m in modalities {
            self.metrics
                .inputs
                .with_label_values(&[&self.model, m.as_str()])
                .inc();
        }
        Ok(Embedded {
            embeddings,
            text_tokens,
            images,
        })
    }

    /// The request's decode budget, from the images' headers alone, before
    /// any input is admitted or decoded: an unreadable header (or an image
    /// over the per-image limits) stops the request at its input, and images
    /// declaring more pixels in all than `max_request_image_pixels` stop it
    /// whole. A header parse per image (at most the request's input count),
    /// no pixel data: cheap enough to run here, on the request's task.
    fn check_images(&self, inputs: &[Input]) -> Result<(), EmbedError> {
        match self.preprocessor.check_request_inputs(inputs) {
            Ok(_) => Ok(()),
            Err(RequestImagesError::Image { index, source }) => {
                Err(EmbedError::Input { index, source })
            }
            Err(RequestImagesError::OverBudget {
                images,
                pixels,
                limit,
            }) => Err(EmbedError::ImageBudget {
                images,
                pixels,
                limit,
            }),
        }
    }

    /// Preprocesses every input on the blocking pool, at most the pool's
    /// concurrency at once (short texts inline: [`INLINE_TEXT_BYTES`]), and
    /// returns them in order (or the first error).
    /// The first input that fails stops the request: inputs not started yet
    /// are skipped, not decoded.
    async fn prepare_all(
        &self,
        inputs: Vec<Input>,
        truncate: bool,
    ) -> Result<Vec<(Prepared, Option<CacheKey>)>, EmbedError> {
        // Set when the request goes away or one of its inputs fails.
        let cancelled = Arc::new(AtomicBool::new(false));
        let _guard = CancelOnDrop(Arc::clone(&cancelled));
        let n = inputs.len();
        let mut jobs = Vec::with_capacity(n);
        for input in inputs {
            if inline(&input) {
                if cancelled.load(Ordering::Relaxed) {
                    break;
                }
                let start = Instant::now();
                let result = self.preprocessor.prepare(&input, truncate);
                self.metrics
                    .preprocess_duration
                    .with_label_values(&[&self.model, input.modality().as_str()])
                    .observe(start.elapsed().as_secs_f64());
                if result.is_err() {
                    cancelled.store(true, Ordering::Relaxed);
                }
                jobs.push(Job::Done(
                    result
                        .map_err(Some)
                        .map(|p| with_key(self.cache.as_deref(), p, &input)),
                ));
                continue;
            }
            let permit = Arc::clone(&self.pool.permits)
                .acquire_owned()
                .await
                .map_err(|_| EmbedError::Internal("the preprocessing pool is closed".into()))?;
            if cancelled.load(Ordering::Relaxed) {
                break;
            }
            let pre = Arc::clone(&self.preprocessor);
            let cancelled = Arc::clone(&cancelled);
            let hist = self.metrics.preprocess_duration.clone();
            let model = self.model.clone();
            let cache = self.cache.clone();
            jobs.push(Job::Spawned(tokio::task::spawn_blocking(move || {
                let _permit = permit;
                if cancelled.load(Ordering::Relaxed) {
                    // Skipped: the request was dropped or another input failed.
                    return Err(None);
                }
                let start = Instant::now();
                let result = pre.prepare(&input, truncate);
                hist.with_label_values(&[&model, input.modality().as_str()])
                    .observe(start.elapsed().as_secs_f64());
                if result.is_err() {
                    cancelled.store(true, Ordering::Relaxed);
                }
                // The cache key is hashed here, on the pool, beside the
                // preprocessing it follows.
                result
                    .map_err(Some)
                    .map(|p| with_key(cache.as_deref(), p, &input))
            })));
        }
        let mut out = Vec::with_capacity(jobs.len());
        let mut skipped = false;
        for (index, job) in jobs.into_iter().enumerate() {
            let done = match job {
                Job::Done(r) => Ok(r),
                Job::Spawned(handle) => handle.await,
            };
            match done {
                Ok(Ok(p)) => out.push(p),
                Ok(Err(Some(source))) => return Err(EmbedError::Input { index, source }),
                Ok(Err(None)) => skipped = true,
                Err(e) => {
                    return Err(EmbedError::Input {
                        index,
                        source: PreprocessError::Internal(format!("preprocessing panicked: {e}")),
                    })
                }
            }
        }
        if skipped || out.len() < n {
            return Err(EmbedError::Internal(
                "preprocessing stopped without an error".into(),
            ));
        }
        Ok(out)
    }
}
