//! Matrix products on oneDNN's matmul primitive (the `onednn` build
//! feature): safe, small bindings of our own over its C API v2 ([`sys`]).
//!
//! Owns the process's oneDNN state: one CPU engine, one stream behind a
//! lock (see "Threads"), the weight layouts oneDNN prefers per shape, and a
//! cache of matmul primitives per shape (creating one compiles kernels:
//! 0.3-1 ms; executing a cached one costs nothing extra). It uses rayon
//! only to round activations to bf16 (outside the lock), and may not touch
//! the native kernels or anything above `ops`: a [`Weights`] is what
//! [`super::Linear`] holds when it runs here.
//!
//! What runs: `y[rows, n] (+)= act(x[rows, k] · Wᵀ + b)` with `W` reordered
//! once, at load, into the blocked layout oneDNN's kernels want for its
//! `(k, n)` and data type, the bias and the activation (quick-GELU is
//! oneDNN's `swish` with alpha 1.702) fused as post-ops, and a residual as
//! the `sum` post-op. In bf16 the weights and the activations are bf16
//! (rounded to nearest even like the native kernels), accumulation and
//! output f32. On CPUs with AMX (Intel Xeon 4th generation and later)
//! oneDNN runs bf16 products on the tiles; elsewhere on its AVX-512 or AVX2
//! kernels.
//!
//! Threads: Debian's oneDNN runs on GNU OpenMP. Each product sets the
//! calling thread's OpenMP team to rayon's thread count (the native kernels'
//! pool), so the two pools use the same cores and never more of them, and
//! products run one at a time behind one lock (which also guards the
//! stream, a oneDNN stream being usable from one thread at a time): two
//! replicas on the CPU then share the cores the way they share rayon's
//! pool, instead of running two OpenMP teams side by side. Between
//! products OpenMP's threads spin for a while before they sleep; set
//! `OMP_WAIT_POLICY=passive` to make them sleep at once (see README).
//!
//! The library is linked dynamically (`libdnnl.so.2`, Debian's `libdnnl2`
//! and `libdnnl-dev`); it is checked to be oneDNN 2.x before first use.

mod sys;

use std::collections::HashMap;
use std::ffi::{c_int, c_void, CStr};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use rayon::prelude::*;

use super::avx512;

/// A oneDNN status other than success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status(c_int);

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            1 => "out of memory",
            2 => "invalid arguments",
            3 => "unimplemented",
            4 => "iterator ends",
            5 => "runtime error",
            6 => "not required",
            _ => return write!(f, "status {}", self.0),
        };
        f.write_str(name)
    }
}

/// Why a oneDNN product could not be set up or run.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OnednnError {
    /// A C API call returned an error status.
    #[error("oneDNN {call} failed: {status}")]
    Call { call: &'static str, status: Status },
    /// The library linked at run time is not oneDNN 2.x.
    #[error("oneDNN {found} is linked, but this build speaks the C API of oneDNN 2.x")]
    Version { found: String },
    /// A slice is shorter than the product's shape needs.
    #[error("oneDNN product: {what} needs {need} elements, has {have}")]
    Short {
        what: &'static str,
        need: usize,
        have: usize,
    },
}

fn check(call: &'static str, status: sys::dnnl_status_t) -> Result<(), OnednnError> {
    if status == sys::DNNL_SUCCESS {
        Ok(())
    } else {
        Err(OnednnError::Call {
            call,
            status: Status(status),
        })
    }
}

/// The element type of the weights and activations of a product (the
/// output and the accumulation are f32 either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    Bf16,
}

impl Dtype {
    fn raw(self) -> sys::dnnl_data_type_t {
        match self {
            Dtype::F32 => sys::DNNL_F32,
            Dtype::Bf16 => sys::DNNL_BF16,
        }
    }
}

/// What follows `x · Wᵀ + b` in a product.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Post {
    /// `y = x · Wᵀ + b`.
    Store,
    /// `y += x · Wᵀ + b` (a residual connection).
    Accumulate,
    /// `y = z · sigmoid(alpha · z)` with `z = x · Wᵀ + b` (quick-GELU is
    /// alpha 1.702).
    Swish(f32),
}

impl Post {
    /// A hashable form for the primitive cache.
    fn key(self) -> (u8, u32) {
        match self {
            Post::Store => (0, 0),
            Post::Accumulate => (1, 0),
            Post::Swish(a) => (2, a.to_bits()),
        }
    }
}

/// Declares owning wrappers of oneDNN handles, each destroyed on drop.
macro_rules! handles {
    ($($(#[$m:meta])* $name:ident($raw:ty) => $destroy:ident;)+) => {$(
        $(#[$m])*
        struct $name($raw);

        impl Drop for $name {
            fn drop(&mut self) {
                // SAFETY: the handle was created by the library, is owned
                // by this wrapper alone and is not used after this.
                unsafe { sys::$destroy(self.0) };
            }
        }
    )+};
}

handles! {
    /// The CPU engine.
    Engine(sys::dnnl_engine_t) => dnnl_engine_destroy;
    /// A stream: execution queue of the engine (in order, synchronous on the CPU).
    Stream(sys::dnnl_stream_t) => dnnl_stream_destroy;
    /// A memory object over a buffer it does not own.
    Memory(sys::dnnl_memory_t) => dnnl_memory_destroy;
    /// A primitive descriptor (the chosen implementation of an operation).
    PrimitiveDesc(sys::dnnl_primitive_desc_t) => dnnl_primitive_desc_destroy;
    /// A compiled primitive.
    Primitive(sys::dnnl_primitive_t) => dnnl_primitive_destroy;
    /// Primitive attributes (post-ops).
    Attr(sys::dnnl_primitive_attr_t) => dnnl_primitive_attr_destroy;
    /// A post-op chain.
    PostOps(sys::dnnl_post_ops_t) => dnnl_post_ops_destroy;
}

// SAFETY: oneDNN engines are thread-safe: primitives and memory objects may
// be created on one from any thread at once; the wrapper only destroys it.
unsafe impl Send for Engine {}
// SAFETY: as for `Send`: every use of the engine from several threads at
// once is one the library supports.
unsafe impl Sync for Engine {}
// SAFETY: a stream may move between threads; it is used by one thread at a
// time, which the `Mutex` around it in `Runtime` guarantees.
unsafe impl Send for Stream {}
// SAFETY: a primitive is immutable once created and oneDNN supports
// executing one from several threads at once (each with its own memory
// objects); the cache shares it read-only and destroys it once, on drop.
unsafe impl Send for Primitive {}
// SAFETY: see `Send`.
unsafe impl Sync for Primitive {}

/// The process's oneDNN state.
struct Runtime {
    engine: Engine,
    /// The one stream; holding its lock is what lets a thread execute.
    stream: Mutex<Stream>,
    info: Info,
}

/// What the linked oneDNN is and what it runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// `major.minor.patch`.
    pub version: String,
    /// The instruction set oneDNN's kernels use here (its name for it).
    pub isa: &'static str,
    /// Whether that includes the AMX tiles.
    pub amx: bool,
}

impl fmt::Display for Info {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "oneDNN {} ({})", self.version, self.isa)
    }
}

fn isa_name(isa: sys::dnnl_cpu_isa_t) -> &'static str {
    match isa {
        sys::DNNL_CPU_ISA_AVX512_CORE_AMX => "avx512_core_amx",
        sys::DNNL_CPU_ISA_AVX512_CORE_BF16 => "avx512_core_bf16",
        sys::DNNL_CPU_ISA_AVX512_CORE_VNNI => "avx512_core_vnni",
        sys::DNNL_CPU_ISA_AVX512_CORE => "avx512_core",
        sys::DNNL_CPU_ISA_AVX2 => "avx2",
        _ => "other",
    }
}

impl Runtime {
    fn new() -> Result<Runtime, OnednnError> {
        // SAFETY: `dnnl_version` returns a pointer to a static struct of
        // the library, valid for the life of the process.
        let v = unsafe { &*sys::dnnl_version() };
        let version = format!("{}.{}.{}", v.major, v.minor, v.patch);
        if v.major != 2 {
            return Err(OnednnError::Version { found: version });
        }
        let mut engine = std::ptr::null_mut();
        // SAFETY: `engine` is a valid out-pointer; CPU engine 0 always exists.
        check("engine_create", unsafe {
            sys::dnnl_engine_create(&mut engine, sys::DNNL_CPU, 0)
        })?;
        let engine = Engine(engine);
        let mut stream = std::ptr::null_mut();
        // SAFETY: `stream` is a valid out-pointer and `engine` a live engine.
        check("stream_create", unsafe {
            sys::dnnl_stream_create(&mut stream, engine.0, sys::DNNL_STREAM_DEFAULT_FLAGS)
        })?;
        let stream = Stream(stream);
        // SAFETY: a plain query without arguments.
        let isa = unsafe { sys::dnnl_get_effective_cpu_isa() };
        Ok(Runtime {
            engine,
            stream: Mutex::new(stream),
            info: Info {
                version,
                isa: isa_name(isa),
                amx: isa == sys::DNNL_CPU_ISA_AVX512_CORE_AMX,
            },
        })
    }

    /// Runs `prim` with `args` on the stream, alone, on an OpenMP team of
    /// rayon's size, and waits for it.
    fn execute(&self, prim: &Primitive, args: &[sys::dnnl_exec_arg_t]) -> Result<(), OnednnError> {
        let stream = self.lock();
        let threads = c_int::try_from(super::threads()).unwrap_or(c_int::MAX);
        // SAFETY: sets an OpenMP setting of the calling thread; no memory
        // is involved.
        unsafe { sys::omp_set_num_threads(threads) };
        let nargs = c_int::try_from(args.len()).unwrap_or(c_int::MAX);
        // SAFETY: `prim` is a live primitive, `stream` a live stream this
        // thread holds the lock of, and `args` the memory objects the
        // primitive reads and writes, each over a buffer its caller keeps
        // alive (and, for outputs, exclusively borrowed) until this returns;
        // the wait below makes sure the work is done by then.
        check("primitive_execute", unsafe {
            sys::dnnl_primitive_execute(prim.0, stream.0, nargs, args.as_ptr())
        })?;
        // SAFETY: a live stream held under the lock.
        check("stream_wait", unsafe { sys::dnnl_stream_wait(stream.0) })
    }

    fn lock(&self) -> MutexGuard<'_, Stream> {
        // A panic while the lock was held cannot have left the stream
        // half-changed: nothing but C calls run under it.
        self.stream.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A memory object over `data` (which the caller keeps alive while the
    /// object is in use).
    fn memory(
        &self,
        md: &sys::dnnl_memory_desc_t,
        data: *mut c_void,
    ) -> Result<Memory, OnednnError> {
        let mut mem = std::ptr::null_mut();
        // SAFETY: valid out-pointer, a memory descriptor made by the
        // library, a live engine; the handle is only stored by the library.
        check("memory_create", unsafe {
            sys::dnnl_memory_create(&mut mem, md, self.engine.0, data)
        })?;
        Ok(Memory(mem))
    }
}

static RUNTIME: OnceLock<Result<Runtime, OnednnError>> = OnceLock::new();

fn runtime() -> Result<&'static Runtime, OnednnError> {
    RUNTIME
        .get_or_init(Runtime::new)
        .as_ref()
        .map_err(Clone::clone)
}

/// The linked oneDNN and the instruction set it uses here, or why it cannot
/// be used.
pub fn info() -> Result<Info, OnednnError> {
    runtime().map(|r| r.info.clone())
}

/// A 2D memory descriptor of `dims` in a plain layout (`tag`) or left to
/// the primitive (`any`).
fn md_tag(
    dims: [usize; 2],
    dt: Dtype,
    tag: sys::dnnl_format_tag_t,
) -> Result<sys::dnnl_memory_desc_t, OnednnError> {
    let dims: [i64; 2] = [dim(dims[0]), dim(dims[1])];
    let mut md = sys::dnnl_memory_desc_t::zeroed();
    // SAFETY: `md` is a valid out-pointer of the struct's full size and
    // `dims` holds the 2 dimensions announced.
    check("memory_desc_init_by_tag", unsafe {
        sys::dnnl_memory_desc_init_by_tag(&mut md, 2, dims.as_ptr(), dt.raw(), tag)
    })?;
    Ok(md)
}

/// Shapes are bounded by slices in memory, far below `i64::MAX`.
fn dim(x: usize) -> i64 {
    i64::try_from(x).unwrap_or(i64::MAX)
}

fn md_equal(a: &sys::dnnl_memory_desc_t, b: &sys::dnnl_memory_desc_t) -> bool {
    // SAFETY: both point to initialised descriptors.
    unsafe { sys::dnnl_memory_desc_equal(a, b) != 0 }
}

fn md_size(md: &sys::dnnl_memory_desc_t) -> usize {
    // SAFETY: points to an initialised descriptor.
    unsafe { sys::dnnl_memory_desc_get_size(md) }
}

/// One product a primitive computes: `rows x k` by `k x n` of `shape`,
/// with or without a bias, then `post`.
#[derive(Debug, Clone, Copy)]
struct Product {
    rows: usize,
    shape: Shape,
    bias: bool,
    post: Post,
}

impl Product {
    /// The primitive cache's key.
    fn key(self) -> Key {
        Key {
            rows: self.rows,
            shape: self.shape,
            bias: self.bias,
            post: self.post.key(),
        }
    }
}

/// A matmul primitive descriptor for product `p` with `weights` as the
/// weights' descriptor (`any`: oneDNN's choice).
fn matmul_pd(
    rt: &Runtime,
    p: Product,
    weights: &sys::dnnl_memory_desc_t,
) -> Result<PrimitiveDesc, OnednnError> {
    let Product {
        rows,
        shape,
        bias,
        post,
    } = p;
    let src = md_tag([rows, shape.k], shape.dtype, sys::DNNL_AB)?;
    let dst = md_tag([rows, shape.n], Dtype::F32, sys::DNNL_AB)?;
    let bias_md = md_tag([1, shape.n], Dtype::F32, sys::DNNL_AB)?;
    let mut desc = sys::dnnl_matmul_desc_t::zeroed();
    // SAFETY: `desc` is a valid out-pointer; the descriptors are
    // initialised; a null bias descriptor means "no bias".
    check("matmul_desc_init", unsafe {
        sys::dnnl_matmul_desc_init(
            &mut desc,
            &src,
            weights,
            if bias { &bias_md } else { std::ptr::null() },
            &dst,
        )
    })?;
    let mut attr = std::ptr::null_mut();
    // SAFETY: valid out-pointer.
    check("primitive_attr_create", unsafe {
        sys::dnnl_primitive_attr_create(&mut attr)
    })?;
    let attr = Attr(attr);
    if post != Post::Store {
        let mut ops = std::ptr::null_mut();
        // SAFETY: valid out-pointer.
        check("post_ops_create", unsafe {
            sys::dnnl_post_ops_create(&mut ops)
        })?;
        let ops = PostOps(ops);
        match post {
            Post::Store => {}
            // SAFETY: a live post-op chain.
            Post::Accumulate => check("post_ops_append_sum", unsafe {
                sys::dnnl_post_ops_append_sum(ops.0, 1.0)
            })?,
            // SAFETY: a live post-op chain.
            Post::Swish(alpha) => check("post_ops_append_eltwise", unsafe {
                sys::dnnl_post_ops_append_eltwise(ops.0, 1.0, sys::DNNL_ELTWISE_SWISH, alpha, 0.0)
            })?,
        }
        // SAFETY: live attributes and post-ops; the attributes keep a copy.
        check("primitive_attr_set_post_ops", unsafe {
            sys::dnnl_primitive_attr_set_post_ops(attr.0, ops.0)
        })?;
    }
    let mut pd = std::ptr::null_mut();
    // SAFETY: valid out-pointer, an initialised matmul descriptor (the op
    // descriptor the library reads through the untyped pointer), live
    // attributes and engine, no hint.
    check("primitive_desc_create (matmul)", unsafe {
        sys::dnnl_primitive_desc_create(
            &mut pd,
            (&desc as *const sys::dnnl_matmul_desc_t).cast(),
            attr.0,
            rt.engine.0,
            std::ptr::null(),
        )
    })?;
    Ok(PrimitiveDesc(pd))
}

fn primitive(pd: &PrimitiveDesc) -> Result<Primitive, OnednnError> {
    let mut p = std::ptr::null_mut();
    // SAFETY: valid out-pointer and a live primitive descriptor.
    check("primitive_create", unsafe {
        sys::dnnl_primitive_create(&mut p, pd.0)
    })?;
    Ok(Primitive(p))
}

/// The implementation oneDNN picked (e.g. `brg:avx512_core_amx`).
fn impl_name(pd: &PrimitiveDesc) -> String {
    let mut s: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: the query writes a pointer to a string owned by `pd`, which
    // is copied out before `pd` can be destroyed.
    let ok = unsafe {
        sys::dnnl_primitive_desc_query(
            pd.0,
            sys::DNNL_QUERY_IMPL_INFO_STR,
            0,
            (&mut s as *mut *const std::ffi::c_char).cast(),
        )
    };
    if ok != sys::DNNL_SUCCESS || s.is_null() {
        return "unknown".into();
    }
    // SAFETY: a NUL-terminated string owned by `pd`, alive here.
    unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
}

/// The weights descriptor a primitive descriptor settled on.
fn weights_md(pd: &PrimitiveDesc) -> Result<sys::dnnl_memory_desc_t, OnednnError> {
    // SAFETY: a live primitive descriptor; the result points into it and
    // is copied before `pd` can be destroyed.
    let md = unsafe { sys::dnnl_primitive_desc_query_md(pd.0, sys::DNNL_QUERY_WEIGHTS_MD, 0) };
    if md.is_null() {
        return Err(OnednnError::Call {
            call: "primitive_desc_query_md (weights)",
            status: Status(2),
        });
    }
    // SAFETY: non-null, points to an initialised descriptor (see above).
    Ok(unsafe { *md })
}

/// Reorders `src` (laid out as `src_md`) into `dst` (as `dst_md`).
fn reorder(
    rt: &Runtime,
    src_md: &sys::dnnl_memory_desc_t,
    src: *const c_void,
    dst_md: &sys::dnnl_memory_desc_t,
    dst: *mut c_void,
) -> Result<(), OnednnError> {
    let mut pd = std::ptr::null_mut();
    // SAFETY: valid out-pointer, initialised descriptors, live engine, no
    // attributes.
    check("reorder_primitive_desc_create", unsafe {
        sys::dnnl_reorder_primitive_desc_create(
            &mut pd,
            src_md,
            rt.engine.0,
            dst_md,
            rt.engine.0,
            std::ptr::null(),
        )
    })?;
    let pd = PrimitiveDesc(pd);
    let prim = primitive(&pd)?;
    // The source is only read by a reorder.
    let from = rt.memory(src_md, src.cast_mut())?;
    let to = rt.memory(dst_md, dst)?;
    rt.execute(
        &prim,
        &[
            sys::dnnl_exec_arg_t {
                arg: sys::DNNL_ARG_FROM,
                memory: from.0,
            },
            sys::dnnl_exec_arg_t {
                arg: sys::DNNL_ARG_TO,
                memory: to.0,
            },
        ],
    )
}

/// The weights' side of a product: `k` inputs, `n` outputs, element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Shape {
    k: usize,
    n: usize,
    dtype: Dtype,
}

/// Rows of the product whose weight layout is taken as the layout of every
/// product of the same [`Shape`] (oneDNN's blocked layouts depend on `k`,
/// `n`, the type and the CPU, not on the rows; a product whose
/// implementation wants another layout anyway is still served, see
/// [`Matmul::reorder`]).
const LAYOUT_ROWS: usize = 256;

/// The weights layout for `shape`, the same for every weight of that shape
/// (so that primitives can be shared by shape).
fn layout(rt: &Runtime, shape: Shape) -> Result<sys::dnnl_memory_desc_t, OnednnError> {
    static LAYOUTS: OnceLock<Mutex<HashMap<Shape, sys::dnnl_memory_desc_t>>> = OnceLock::new();
    let map = LAYOUTS.get_or_init(Default::default);
    if let Some(md) = map.lock().unwrap_or_else(|e| e.into_inner()).get(&shape) {
        return Ok(*md);
    }
    let any = md_tag([shape.k, shape.n], shape.dtype, sys::DNNL_FORMAT_TAG_ANY)?;
    let probe = Product {
        rows: LAYOUT_ROWS,
        shape,
        bias: false,
        post: Post::Store,
    };
    let pd = matmul_pd(rt, probe, &any)?;
    let md = weights_md(&pd)?;
    Ok(*map
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(shape)
        .or_insert(md))
}

/// A cached matmul primitive.
struct Matmul {
    prim: Primitive,
    /// The weights layout this primitive wants when it is not the shape's
    /// [`layout`] (it then gets a reordered copy per call; not seen with
    /// oneDNN 2.6's brgemm kernels, kept so that no shape can fail).
    reorder: Option<sys::dnnl_memory_desc_t>,
    /// oneDNN's name of the implementation.
    name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    rows: usize,
    shape: Shape,
    bias: bool,
    post: (u8, u32),
}

/// Primitives kept; when full the cache starts over (oneDNN's own
/// primitive cache, 1024 entries, still makes re-creating them cheap).
const CACHE_CAPACITY: usize = 2048;

fn matmul(
    rt: &Runtime,
    p: Product,
    weights: &sys::dnnl_memory_desc_t,
) -> Result<Arc<Matmul>, OnednnError> {
    static CACHE: OnceLock<Mutex<HashMap<Key, Arc<Matmul>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = p.key();
    if let Some(m) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(Arc::clone(m));
    }
    let (pd, reorder) = match matmul_pd(rt, p, weights) {
        Ok(pd) => (pd, None),
        Err(fixed) => {
            // No implementation takes the shape's layout at this row count:
            // let oneDNN choose, and reorder the weights for it per call.
            let any = md_tag(
                [p.shape.k, p.shape.n],
                p.shape.dtype,
                sys::DNNL_FORMAT_TAG_ANY,
            )?;
            let pd = matmul_pd(rt, p, &any).map_err(|_| fixed)?;
            let md = weights_md(&pd)?;
            let reorder = (!md_equal(&md, weights)).then_some(md);
            (pd, reorder)
        }
    };
    let m = Arc::new(Matmul {
        prim: primitive(&pd)?,
        reorder,
        name: impl_name(&pd),
    });
    let mut map = cache.lock().unwrap_or_else(|e| e.into_inner());
    if map.len() >= CACHE_CAPACITY {
        map.clear();
    }
    Ok(Arc::clone(map.entry(key).or_insert(m)))
}

/// 64 bytes, 64-aligned: the unit of the weights buffer (oneDNN's kernels
/// read it with aligned loads where they can).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A `[n, k]` weight (PyTorch `Linear` layout) reordered into oneDNN's
/// layout for its shape, with its bias.
#[derive(Clone)]
pub struct Weights {
    data: Vec<Line>,
    /// Its layout (boxed: 696 bytes).
    md: Box<sys::dnnl_memory_desc_t>,
    shape: Shape,
    bias: Option<Vec<f32>>,
}

impl fmt::Debug for Weights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("onednn::Weights")
            .field("k", &self.shape.k)
            .field("n", &self.shape.n)
            .field("dtype", &self.shape.dtype)
            .field("bytes", &md_size(&self.md))
            .field("bias", &self.bias.is_some())
            .finish()
    }
}

/// bf16 bits of `src`, rounded to nearest even as the native kernels do, as
/// words holding two values each (the first in the low half): `dst` must
/// hold `src.len().div_ceil(2)` words.
fn to_bf16(src: &[f32], dst: &mut [u32]) {
    const CHUNK: usize = 1 << 14;
    dst.par_chunks_mut(CHUNK / 2)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| avx512::bf16_pairs(s, d));
}

impl Weights {
    /// Reorders `w` (`n` rows of `k`) once; `bias` has `n` values.
    pub fn new(
        w: &[f32],
        bias: Option<Vec<f32>>,
        n: usize,
        k: usize,
        dtype: Dtype,
    ) -> Result<Self, OnednnError> {
        if w.len() < n * k {
            return Err(OnednnError::Short {
                what: "weight",
                need: n * k,
                have: w.len(),
            });
        }
        if let Some(b) = &bias {
            if b.len() != n {
                return Err(OnednnError::Short {
                    what: "bias",
                    need: n,
                    have: b.len(),
                });
            }
        }
        let rt = runtime()?;
        let shape = Shape { k, n, dtype };
        let md = layout(rt, shape)?;
        let mut data = vec![Line([0; 64]); md_size(&md).div_ceil(64)];
        // `W` as a k x n matrix is W[n, k] read with k innermost: `ba`.
        let plain = md_tag([k, n], dtype, sys::DNNL_BA)?;
        let dst = data.as_mut_ptr().cast::<c_void>();
        match dtype {
            Dtype::F32 => reorder(rt, &plain, w.as_ptr().cast(), &md, dst)?,
            Dtype::Bf16 => {
                let mut words = vec![0u32; (n * k).div_ceil(2)];
                to_bf16(&w[..n * k], &mut words);
                reorder(rt, &plain, words.as_ptr().cast(), &md, dst)?;
            }
        }
        Ok(Weights {
            data,
            md: Box::new(md),
            shape,
            bias,
        })
    }

    pub fn in_dim(&self) -> usize {
        self.shape.k
    }

    pub fn out_dim(&self) -> usize {
        self.shape.n
    }

    /// The product of `rows` rows by this weight, then `post`.
    fn product(&self, rows: usize, post: Post) -> Product {
        Product {
            rows,
            shape: self.shape,
            bias: self.bias.is_some(),
            post,
        }
    }

    /// oneDNN's name for the implementation a `rows`-row product runs on.
    pub fn implementation(&self, rows: usize, post: Post) -> Result<String, OnednnError> {
        let rt = runtime()?;
        let m = matmul(rt, self.product(rows, post), &self.md)?;
        Ok(m.name.clone())
    }

    /// `y[rows, n] = post(x[rows, k] · Wᵀ + b)` (see [`Post`]).
    pub fn matmul(
        &self,
        x: &[f32],
        rows: usize,
        y: &mut [f32],
        post: Post,
    ) -> Result<(), OnednnError> {
        let Shape { k, n, dtype } = self.shape;
        if x.len() < rows * k {
            return Err(OnednnError::Short {
                what: "input",
                need: rows * k,
                have: x.len(),
            });
        }
        if y.len() < rows * n {
            return Err(OnednnError::Short {
                what: "output",
                need: rows * n,
                have: y.len(),
            });
        }
        if rows == 0 || n == 0 {
            return Ok(());
        }
        let rt = runtime()?;
        let mm = matmul(rt, self.product(rows, post), &self.md)?;
        let x = &x[..rows * k];
        let y = &mut y[..rows * n];
        // The activations as the weights' type (bf16: rounded like the
        // native kernels round them).
        let words;
        let src_ptr: *const c_void = match dtype {
            Dtype::F32 => x.as_ptr().cast(),
            Dtype::Bf16 => {
                let mut w = vec![0u32; x.len().div_ceil(2)];
                to_bf16(x, &mut w);
                words = w;
                words.as_ptr().cast()
            }
        };
        let src_md = md_tag([rows, k], dtype, sys::DNNL_AB)?;
        let dst_md = md_tag([rows, n], Dtype::F32, sys::DNNL_AB)?;
        // The weights as this primitive wants them: the shape's layout, or
        // (see `Matmul::reorder`) a copy reordered for it.
        let mut copy: Vec<Line> = Vec::new();
        let (w_md, w_ptr) = match &mm.reorder {
            None => (*self.md, self.data.as_ptr().cast::<c_void>()),
            Some(md) => {
                copy = vec![Line([0; 64]); md_size(md).div_ceil(64)];
                let to = copy.as_mut_ptr().cast::<c_void>();
                reorder(rt, &self.md, self.data.as_ptr().cast(), md, to)?;
                (*md, copy.as_ptr().cast::<c_void>())
            }
        };
        // Inputs are only read by a matmul; the library's handle type is
        // not const.
        let src = rt.memory(&src_md, src_ptr.cast_mut())?;
        let wei = rt.memory(&w_md, w_ptr.cast_mut())?;
        let dst = rt.memory(&dst_md, y.as_mut_ptr().cast())?;
        let mut args = vec![
            sys::dnnl_exec_arg_t {
                arg: sys::DNNL_ARG_SRC,
                memory: src.0,
            },
            sys::dnnl_exec_arg_t {
                arg: sys::DNNL_ARG_WEIGHTS,
                memory: wei.0,
            },
            sys::dnnl_exec_arg_t {
                arg: sys::DNNL_ARG_DST,
                memory: dst.0,
            },
        ];
        let bias_mem = match &self.bias {
            Some(b) => {
                let md = md_tag([1, n], Dtype::F32, sys::DNNL_AB)?;
                let mem = rt.memory(&md, b.as_ptr().cast_mut().cast())?;
                args.push(sys::dnnl_exec_arg_t {
                    arg: sys::DNNL_ARG_BIAS,
                    memory: mem.0,
                });
                Some(mem)
            }
            None => None,
        };
        rt.execute(&mm.prim, &args)?;
        drop((src, wei, dst, bias_mem, copy));
        Ok(())
    }
}

#[cfg(test)]
mod tests;
