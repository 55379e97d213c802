//! The few declarations of oneDNN's C API v2 (`dnnl.h` of oneDNN 2.x, ABI
//! `libdnnl.so.2`, Debian's `libdnnl-dev`) that [`super`] uses, written by
//! hand, and OpenMP's `omp_set_num_threads` (Debian's oneDNN runs on GNU
//! OpenMP).
//!
//! Owns nothing but declarations: the values of the enums are those of
//! `dnnl_types.h` 2.6, and the structs mirror its layouts field for field
//! (the format union and the extra description are kept as opaque words:
//! nothing here reads them). The sizes are checked at compile time against
//! `sizeof` in C, and a unit test checks that the library writes no byte
//! past them. Every function here is `unsafe` to call; [`super`] is the
//! only caller.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_uint, c_void};

/// `dnnl_status_t`.
pub type dnnl_status_t = c_int;
pub const DNNL_SUCCESS: dnnl_status_t = 0;

/// `dnnl_data_type_t`.
pub type dnnl_data_type_t = c_int;
pub const DNNL_BF16: dnnl_data_type_t = 2;
pub const DNNL_F32: dnnl_data_type_t = 3;

/// `dnnl_format_tag_t`.
pub type dnnl_format_tag_t = c_int;
pub const DNNL_FORMAT_TAG_ANY: dnnl_format_tag_t = 1;
/// Plain row-major 2D.
pub const DNNL_AB: dnnl_format_tag_t = 3;
/// 2D with the first dimension innermost (a transposed row-major matrix).
pub const DNNL_BA: dnnl_format_tag_t = 22;

/// `dnnl_engine_kind_t`.
pub const DNNL_CPU: c_int = 1;
/// `dnnl_stream_flags_t`.
pub const DNNL_STREAM_DEFAULT_FLAGS: c_uint = 1;

/// `dnnl_query_t`.
pub type dnnl_query_t = c_int;
pub const DNNL_QUERY_IMPL_INFO_STR: dnnl_query_t = 8;
pub const DNNL_QUERY_WEIGHTS_MD: dnnl_query_t = 131;

/// `dnnl_alg_kind_t`: `x * sigmoid(alpha * x)`.
pub const DNNL_ELTWISE_SWISH: c_int = 223;

/// `DNNL_ARG_*`.
pub const DNNL_ARG_SRC: c_int = 1;
pub const DNNL_ARG_DST: c_int = 17;
pub const DNNL_ARG_WEIGHTS: c_int = 33;
pub const DNNL_ARG_BIAS: c_int = 41;
pub const DNNL_ARG_FROM: c_int = DNNL_ARG_SRC;
pub const DNNL_ARG_TO: c_int = DNNL_ARG_DST;

/// `dnnl_cpu_isa_t`: the values [`dnnl_get_effective_cpu_isa`] reports.
pub type dnnl_cpu_isa_t = c_int;
pub const DNNL_CPU_ISA_AVX2: dnnl_cpu_isa_t = 0x7;
pub const DNNL_CPU_ISA_AVX512_CORE: dnnl_cpu_isa_t = 0x27;
pub const DNNL_CPU_ISA_AVX512_CORE_VNNI: dnnl_cpu_isa_t = 0x67;
pub const DNNL_CPU_ISA_AVX512_CORE_BF16: dnnl_cpu_isa_t = 0xe7;
/// AVX-512 with AMX tiles (int8 and bf16).
pub const DNNL_CPU_ISA_AVX512_CORE_AMX: dnnl_cpu_isa_t = 0x3e7;

/// `DNNL_MAX_NDIMS`.
pub const DNNL_MAX_NDIMS: usize = 12;
pub type dnnl_dims_t = [i64; DNNL_MAX_NDIMS];

/// `dnnl_memory_desc_t` (696 bytes in oneDNN 2.x): plain data, passed by
/// pointer only.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct dnnl_memory_desc_t {
    pub ndims: c_int,
    pub dims: dnnl_dims_t,
    pub data_type: dnnl_data_type_t,
    pub padded_dims: dnnl_dims_t,
    pub padded_offsets: dnnl_dims_t,
    pub offset0: i64,
    pub format_kind: c_int,
    /// The union of `dnnl_blocking_desc_t`, `dnnl_wino_desc_t` and
    /// `dnnl_rnn_packed_desc_t` (296 bytes, 8-aligned).
    pub format_desc: [u64; 37],
    /// `dnnl_memory_extra_desc_t` (80 bytes, 8-aligned).
    pub extra: [u64; 10],
}

impl dnnl_memory_desc_t {
    /// All zeros: a valid value of every field (the library fills it in).
    pub const fn zeroed() -> Self {
        dnnl_memory_desc_t {
            ndims: 0,
            dims: [0; DNNL_MAX_NDIMS],
            data_type: 0,
            padded_dims: [0; DNNL_MAX_NDIMS],
            padded_offsets: [0; DNNL_MAX_NDIMS],
            offset0: 0,
            format_kind: 0,
            format_desc: [0; 37],
            extra: [0; 10],
        }
    }
}

/// `dnnl_matmul_desc_t` (2800 bytes in oneDNN 2.x).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct dnnl_matmul_desc_t {
    pub primitive_kind: c_int,
    pub src_desc: dnnl_memory_desc_t,
    pub weights_desc: dnnl_memory_desc_t,
    pub bias_desc: dnnl_memory_desc_t,
    pub dst_desc: dnnl_memory_desc_t,
    pub accum_data_type: dnnl_data_type_t,
}

impl dnnl_matmul_desc_t {
    pub const fn zeroed() -> Self {
        dnnl_matmul_desc_t {
            primitive_kind: 0,
            src_desc: dnnl_memory_desc_t::zeroed(),
            weights_desc: dnnl_memory_desc_t::zeroed(),
            bias_desc: dnnl_memory_desc_t::zeroed(),
            dst_desc: dnnl_memory_desc_t::zeroed(),
            accum_data_type: 0,
        }
    }
}

// The layouts of oneDNN 2.6's `dnnl_types.h` (`sizeof` printed by a C
// compiler against Debian's libdnnl-dev 2.6.3).
const _: () = assert!(std::mem::size_of::<dnnl_memory_desc_t>() == 696);
const _: () = assert!(std::mem::align_of::<dnnl_memory_desc_t>() == 8);
const _: () = assert!(std::mem::size_of::<dnnl_matmul_desc_t>() == 2800);
const _: () = assert!(std::mem::size_of::<dnnl_exec_arg_t>() == 16);
const _: () = assert!(std::mem::size_of::<dnnl_version_t>() == 32);

/// `dnnl_exec_arg_t`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct dnnl_exec_arg_t {
    pub arg: c_int,
    pub memory: dnnl_memory_t,
}

/// `dnnl_version_t`.
#[repr(C)]
pub struct dnnl_version_t {
    pub major: c_int,
    pub minor: c_int,
    pub patch: c_int,
    pub hash: *const c_char,
    pub cpu_runtime: c_uint,
    pub gpu_runtime: c_uint,
}

/// Opaque handles (`dnnl_*_t` are pointers to these).
#[repr(C)]
pub struct dnnl_engine {
    _private: [u8; 0],
}
#[repr(C)]
pub struct dnnl_stream {
    _private: [u8; 0],
}
#[repr(C)]
pub struct dnnl_memory {
    _private: [u8; 0],
}
#[repr(C)]
pub struct dnnl_primitive_desc {
    _private: [u8; 0],
}
#[repr(C)]
pub struct dnnl_primitive {
    _private: [u8; 0],
}
#[repr(C)]
pub struct dnnl_primitive_attr {
    _private: [u8; 0],
}
#[repr(C)]
pub struct dnnl_post_ops {
    _private: [u8; 0],
}

pub type dnnl_engine_t = *mut dnnl_engine;
pub type dnnl_stream_t = *mut dnnl_stream;
pub type dnnl_memory_t = *mut dnnl_memory;
pub type dnnl_primitive_desc_t = *mut dnnl_primitive_desc;
pub type dnnl_primitive_t = *mut dnnl_primitive;
pub type dnnl_primitive_attr_t = *mut dnnl_primitive_attr;
pub type dnnl_post_ops_t = *mut dnnl_post_ops;

#[link(name = "dnnl")]
unsafe extern "C" {
    pub fn dnnl_version() -> *const dnnl_version_t;
    pub fn dnnl_get_effective_cpu_isa() -> dnnl_cpu_isa_t;

    pub fn dnnl_engine_create(
        engine: *mut dnnl_engine_t,
        kind: c_int,
        index: usize,
    ) -> dnnl_status_t;
    pub fn dnnl_engine_destroy(engine: dnnl_engine_t) -> dnnl_status_t;

    pub fn dnnl_stream_create(
        stream: *mut dnnl_stream_t,
        engine: dnnl_engine_t,
        flags: c_uint,
    ) -> dnnl_status_t;
    pub fn dnnl_stream_wait(stream: dnnl_stream_t) -> dnnl_status_t;
    pub fn dnnl_stream_destroy(stream: dnnl_stream_t) -> dnnl_status_t;

    pub fn dnnl_memory_desc_init_by_tag(
        memory_desc: *mut dnnl_memory_desc_t,
        ndims: c_int,
        dims: *const i64,
        data_type: dnnl_data_type_t,
        tag: dnnl_format_tag_t,
    ) -> dnnl_status_t;
    pub fn dnnl_memory_desc_get_size(memory_desc: *const dnnl_memory_desc_t) -> usize;
    pub fn dnnl_memory_desc_equal(
        lhs: *const dnnl_memory_desc_t,
        rhs: *const dnnl_memory_desc_t,
    ) -> c_int;

    pub fn dnnl_memory_create(
        memory: *mut dnnl_memory_t,
        memory_desc: *const dnnl_memory_desc_t,
        engine: dnnl_engine_t,
        handle: *mut c_void,
    ) -> dnnl_status_t;
    pub fn dnnl_memory_destroy(memory: dnnl_memory_t) -> dnnl_status_t;

    pub fn dnnl_matmul_desc_init(
        matmul_desc: *mut dnnl_matmul_desc_t,
        src_desc: *const dnnl_memory_desc_t,
        weights_desc: *const dnnl_memory_desc_t,
        bias_desc: *const dnnl_memory_desc_t,
        dst_desc: *const dnnl_memory_desc_t,
    ) -> dnnl_status_t;

    pub fn dnnl_primitive_attr_create(attr: *mut dnnl_primitive_attr_t) -> dnnl_status_t;
    pub fn dnnl_primitive_attr_destroy(attr: dnnl_primitive_attr_t) -> dnnl_status_t;
    pub fn dnnl_primitive_attr_set_post_ops(
        attr: dnnl_primitive_attr_t,
        post_ops: *const dnnl_post_ops,
    ) -> dnnl_status_t;
    pub fn dnnl_post_ops_create(post_ops: *mut dnnl_post_ops_t) -> dnnl_status_t;
    pub fn dnnl_post_ops_destroy(post_ops: dnnl_post_ops_t) -> dnnl_status_t;
    pub fn dnnl_post_ops_append_sum(post_ops: dnnl_post_ops_t, scale: f32) -> dnnl_status_t;
    pub fn dnnl_post_ops_append_eltwise(
        post_ops: dnnl_post_ops_t,
        scale: f32,
        alg_kind: c_int,
        alpha: f32,
        beta: f32,
    ) -> dnnl_status_t;

    pub fn dnnl_primitive_desc_create(
        primitive_desc: *mut dnnl_primitive_desc_t,
        op_desc: *const c_void,
        attr: *const dnnl_primitive_attr,
        engine: dnnl_engine_t,
        hint_forward_primitive_desc: *const dnnl_primitive_desc,
    ) -> dnnl_status_t;
    pub fn dnnl_reorder_primitive_desc_create(
        reorder_primitive_desc: *mut dnnl_primitive_desc_t,
        src_desc: *const dnnl_memory_desc_t,
        src_engine: dnnl_engine_t,
        dst_desc: *const dnnl_memory_desc_t,
        dst_engine: dnnl_engine_t,
        attr: *const dnnl_primitive_attr,
    ) -> dnnl_status_t;
    pub fn dnnl_primitive_desc_query(
        primitive_desc: *const dnnl_primitive_desc,
        what: dnnl_query_t,
        index: c_int,
        result: *mut c_void,
    ) -> dnnl_status_t;
    pub fn dnnl_primitive_desc_query_md(
        primitive_desc: *const dnnl_primitive_desc,
        what: dnnl_query_t,
        index: c_int,
    ) -> *const dnnl_memory_desc_t;
    pub fn dnnl_primitive_desc_destroy(primitive_desc: dnnl_primitive_desc_t) -> dnnl_status_t;

    pub fn dnnl_primitive_create(
        primitive: *mut dnnl_primitive_t,
        primitive_desc: *const dnnl_primitive_desc,
    ) -> dnnl_status_t;
    pub fn dnnl_primitive_execute(
        primitive: *const dnnl_primitive,
        stream: dnnl_stream_t,
        nargs: c_int,
        args: *const dnnl_exec_arg_t,
    ) -> dnnl_status_t;
    pub fn dnnl_primitive_destroy(primitive: dnnl_primitive_t) -> dnnl_status_t;
}

// GNU OpenMP, the threading runtime of Debian's oneDNN (libdnnl2 depends on
// libgomp1; `libgomp.so` comes with gcc, which links Rust programs here).
#[link(name = "gomp")]
unsafe extern "C" {
    /// Sets the size of the calling thread's next parallel regions.
    pub fn omp_set_num_threads(n: c_int);
}
