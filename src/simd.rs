//! Runtime SIMD dispatch: the one mechanism the crate uses to run portable
//! code compiled for a wider instruction set when the CPU has it.
//!
//! Owns: the [`simd_fn!`](crate::simd::simd_fn) macro. A leaf: it depends on
//! nothing in the crate, and the modules that need fast loops (the model
//! kernels, the image resampler) use it instead of writing their own
//! feature detection.
//!
//! Why a macro and not hand-written `#[target_feature]` functions: the body
//! is written once, as safe portable code; the macro compiles it twice
//! (baseline and AVX2+FMA) and picks one at run time, so the only `unsafe`
//! is the call guarded by the feature check, in one place. Results must not
//! depend on the choice: LLVM never contracts `a * b + c` into an FMA on its
//! own in Rust, and integer code is exact either way.

/// Defines `$name` twice (AVX2+FMA and baseline) and picks one at run time.
///
/// Accepts a plain function, optionally generic over `const` parameters
/// (`fn f<const N: usize>(..)`), with a visibility and attributes (doc
/// comments included). The body is compiled `#[inline(always)]` into both
/// variants.
macro_rules! simd_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident $(<$(const $g:ident : $gt:ty),+ $(,)?>)? ($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name $(<$(const $g: $gt),+>)? ($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp $(<$(const $g: $gt),+>)? ($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                /// The body compiled with AVX2 and FMA enabled.
                ///
                /// # Safety
                /// The CPU must support AVX2 and FMA.
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2 $(<$(const $g: $gt),+>)? ($($arg: $ty),*) $(-> $ret)? {
                    imp $(::<$($g),+>)? ($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `avx2` was compiled for.
                    return unsafe { avx2 $(::<$($g),+>)? ($($arg),*) };
                }
            }
            imp $(::<$($g),+>)? ($($arg),*)
        }
    };
}

pub(crate) use simd_fn;

#[cfg(test)]
mod tests {
    simd_fn! {
        /// Sum of `x` times `N`.
        fn scaled_sum<const N: usize>(x: &[u32]) -> u32 {
            x.iter().sum::<u32>() * N as u32
        }
    }

    simd_fn! {
        fn plain(a: u8, b: u8) -> u16 {
            u16::from(a) + u16::from(b)
        }
    }

    #[test]
    fn dispatched_functions_compute_their_body() {
        assert_eq!(scaled_sum::<3>(&[1, 2, 3]), 18);
        assert_eq!(plain(200, 100), 300);
    }
}
