//! Unit tests of the configuration: layering, overrides, validation.

use std::time::Duration;

use super::layering::env_value;
use super::*;
use crate::models::CpuBackend;
use toml::Value;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn write_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vlembed-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn builtin_defaults_parse_and_need_a_model() {
    let c = Config::builtin().unwrap();
    assert_eq!(c.server.port, 8080);
    assert!(c.models.is_empty());
    let err = Config::load(&Layers::default()).unwrap_err().to_string();
    assert!(err.contains("--model"), "{err}");
}

#[test]
fn model_flag_serves_one_model_with_defaults() {
    let layers = Layers {
        flags: Overrides {
            model: Some("BAAI/BGE-VL-base".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let c = Config::load(&layers).unwrap();
    assert_eq!(c.models.len(), 1);
    let m = &c.models[0];
    assert_eq!(m.name, "BAAI/BGE-VL-base");
    assert_eq!(m.devices, vec![DeviceSpec::Cpu]);
    assert_eq!(m.dtype, Precision::F32);
    assert_eq!(m.batching.max_batch_size, 32);
    assert_eq!(m.batching.max_delay, Duration::ZERO);
}

#[test]
fn layers_apply_in_order_file_env_flags() {
    let file = write_file(
        "layers.toml",
        r#"
        [server]
        port = 9000
        host = "127.0.0.1"
        request_timeout_ms = 1234
        [model_defaults]
        max_batch_size = 8
        [[models]]
        name = "a"
        source = "org/a"
        dtype = "f16"
        [[models]]
        name = "b"
        source = "org/b"
        max_batch_size = 4
        devices = ["cuda:0", "cuda:1"]
        "#,
    );
    let layers = Layers {
        file: Some(file),
        env: env(&[
            ("VLEMBED_SERVER__PORT", "9100"),
            ("VLEMBED_SERVER__REQUEST_TIMEOUT_MS", "5000"),
            ("VLEMBED_HOST", "10.0.0.1"),
            ("VLEMBED_SERVER__API_KEYS", "k1, k2"),
            ("VLEMBED_LOG", "debug"),
            ("PATH", "/bin"),
        ]),
        flags: Overrides {
            port: Some(9200),
            ..Default::default()
        },
    };
    let c = Config::load(&layers).unwrap();
    // flags > env > file > defaults
    assert_eq!(c.server.port, 9200);
    assert_eq!(c.server.host, "10.0.0.1");
    assert_eq!(c.server.request_timeout_ms, 5000);
    assert_eq!(c.server.api_keys, vec!["k1", "k2"]);
    assert_eq!(c.server.max_body_bytes, 16777216);
    let a = c.model("a").unwrap();
    assert_eq!((a.dtype, a.batching.max_batch_size), (Precision::F16, 8));
    let b = c.model("b").unwrap();
    assert_eq!(b.batching.max_batch_size, 4);
    assert_eq!(b.devices, vec![DeviceSpec::Cuda(0), DeviceSpec::Cuda(1)]);
    // dtype "auto" (the default) on CUDA devices.
    assert_eq!(b.dtype, Precision::Bf16);
}

#[test]
fn fetch_keys_come_from_files_and_the_environment() {
    let c = Config::builtin().unwrap();
    assert!(!c.server.fetch_image_urls, "URL fetching is off by default");
    assert!(!c.fetch.allow_loopback && !c.fetch.allow_private);
    assert!(c.fetch.allowed_hosts.is_empty() && c.fetch.allowed_cidrs.is_empty());
    assert_eq!(c.fetch.max_redirects, 3);
    let file = write_file(
        "fetch.toml",
        "[server]\nfetch_image_urls = true\n[fetch]\nallow_private = true\n\
         [[models]]\nsource = \"a/b\"\n",
    );
    let c = Config::load(&Layers {
        file: Some(file),
        env: env(&[
            (
                "VLEMBED_FETCH__ALLOWED_HOSTS",
                "img.example.com, *.cdn.example.net",
            ),
            ("VLEMBED_FETCH__ALLOWED_CIDRS", "10.1.0.0/16"),
            ("VLEMBED_FETCH__TIMEOUT_MS", "2500"),
        ]),
        ..Default::default()
    })
    .unwrap();
    assert!(c.server.fetch_image_urls && c.fetch.allow_private);
    assert_eq!(
        c.fetch.allowed_hosts,
        vec!["img.example.com", "*.cdn.example.net"]
    );
    assert_eq!(c.fetch.allowed_cidrs, vec!["10.1.0.0/16"]);
    assert_eq!(c.fetch.timeout(), Duration::from_millis(2500));
}

/// The configuration from a file of `file_text` (written as `name`) and
/// `flags`.
fn load_file(name: &str, file_text: &str, flags: Overrides) -> Config {
    let file = write_file(name, file_text);
    Config::load(&Layers {
        file: Some(file),
        flags,
        ..Default::default()
    })
    .unwrap()
}

/// The error loading a file with `file_text` gives, as text.
fn file_error(name: &str, file_text: &str) -> String {
    let file = write_file(name, file_text);
    Config::load(&Layers {
        file: Some(file),
        ..Default::default()
    })
    .unwrap_err()
    .to_string()
}

#[test]
fn auto_dtype_follows_the_devices_and_explicit_wins() {
    let load = |file_text: &str, flags: Overrides| load_file("auto-dtype.toml", file_text, flags);
    let one = "[[models]]\nsource = \"org/a\"\n";
    assert_eq!(
        load(one, Overrides::default()).models[0].dtype,
        Precision::F32
    );
    let cuda = Overrides {
        devices: Some(vec![DeviceSpec::Cuda(0)]),
        ..Default::default()
    };
    let c = load(one, cuda.clone());
    assert_eq!(c.models[0].dtype, Precision::Bf16);
    // An explicit dtype wins, in the file or as a flag.
    let c = load(
        "[[models]]\nsource = \"org/a\"\ndtype = \"f32\"\n",
        cuda.clone(),
    );
    assert_eq!(c.models[0].dtype, Precision::F32);
    let c = load(
        one,
        Overrides {
            dtype: Some(Precision::F16),
            ..cuda
        },
    );
    assert_eq!(c.models[0].dtype, Precision::F16);
    // A model spread over CPU and GPU stays f32.
    let c = load(
        "[[models]]\nsource = \"org/a\"\ndevices = [\"cpu\", \"cuda:0\"]\n",
        Overrides::default(),
    );
    assert_eq!(c.models[0].dtype, Precision::F32);
    assert_eq!(auto_precision(&[]), Precision::F32);
}

#[test]
fn flags_override_models_and_env_short_forms() {
    let file = write_file(
        "flags.toml",
        "[[models]]\nname = \"a\"\nsource = \"org/a\"\n",
    );
    let layers = Layers {
        file: Some(file.clone()),
        env: env(&[("VLEMBED_DTYPE", "bf16"), ("VLEMBED_DEVICES", "cuda:1")]),
        flags: Overrides {
            devices: Some(vec![DeviceSpec::Cuda(0)]),
            model_name: Some("renamed".into()),
            ..Default::default()
        },
    };
    let c = Config::load(&layers).unwrap();
    assert_eq!(c.models[0].name, "renamed");
    assert_eq!(c.models[0].dtype, Precision::Bf16);
    assert_eq!(c.models[0].devices, vec![DeviceSpec::Cuda(0)]);

    let layers = Layers {
        file: Some(file),
        env: env(&[("VLEMBED_MODEL", "org/from-env")]),
        flags: Overrides::default(),
    };
    let c = Config::load(&layers).unwrap();
    assert_eq!(c.models.len(), 1);
    assert_eq!(c.models[0].name, "org/from-env");
    assert_eq!(c.server.otlp_endpoint, "");

    let c = Config::load(&Layers {
        env: env(&[("VLEMBED_OTLP_ENDPOINT", "http://env:4318")]),
        flags: Overrides {
            model: Some("a/b".into()),
            ..Default::default()
        },
        ..Default::default()
    })
    .unwrap();
    assert_eq!(c.server.otlp_endpoint, "http://env:4318");
    let c = Config::load(&Layers {
        env: env(&[("VLEMBED_OTLP_ENDPOINT", "http://env:4318")]),
        flags: Overrides {
            model: Some("a/b".into()),
            otlp_endpoint: Some("http://flag:4318".into()),
            ..Default::default()
        },
        ..Default::default()
    })
    .unwrap();
    assert_eq!(c.server.otlp_endpoint, "http://flag:4318");
}

#[test]
fn rejects_bad_values_with_their_place() {
    let cases: &[(&str, &str)] = &[
        ("[server]\nprot = 1\n", "prot"),
        ("[server]\nport = \"x\"\n", "port"),
        ("[[models]]\nsource = \"a/b\"\ndevices = [\"tpu\"]\n", "tpu"),
        ("[[models]]\nsource = \"a/b\"\ndtype = \"f64\"\n", "f64"),
        ("[[models]]\nsource = \"a/b\"\nmax_batch_size = 0\n", "max_batch_size"),
        ("[[models]]\nsource = \"a/b\"\nmax_queue_inputs = 4\n", "max_queue_inputs"),
        (
            "[[models]]\nname = \"x\"\nsource = \"a/b\"\n[[models]]\nname = \"x\"\nsource = \"a/c\"\n",
            "distinct",
        ),
        ("[fetch]\ntimeout_ms = 0\n[[models]]\nsource = \"a/b\"\n", "fetch.timeout_ms"),
        ("[fetch]\nallowed_cidrs = [\"10.0.0.0/40\"]\n[[models]]\nsource = \"a/b\"\n", "fetch.allowed_cidrs"),
        ("[fetch]\nallowed_cidrs = [\"ten\"]\n[[models]]\nsource = \"a/b\"\n", "fetch.allowed_cidrs"),
        ("[fetch]\nmax_redirect = 1\n[[models]]\nsource = \"a/b\"\n", "max_redirect"),
        ("[[models]]\nname = \"x\"\n", "source"),
        ("[server\n", "TOML"),
        ("[server]\notlp_endpoint = \"collector:4318\"\n[[models]]\nsource = \"a/b\"\n", "otlp_endpoint"),
        ("[server]\ncors_allowed_origins = [\"*\", \"https://a.b\"]\n[[models]]\nsource = \"a/b\"\n", "cors_allowed_origins"),
        ("[server]\ncors_allowed_origins = [\"\"]\n[[models]]\nsource = \"a/b\"\n", "cors_allowed_origins"),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let file = write_file(&format!("bad{i}.toml"), text);
        let err = Config::load(&Layers {
            file: Some(file),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains(needle), "case {i}: {err}");
    }
    let err = Config::load(&Layers {
        env: env(&[("VLEMBED_PORT", "eighty")]),
        flags: Overrides {
            model: Some("a/b".into()),
            ..Default::default()
        },
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("VLEMBED_PORT"), "{err}");
    let err = Config::load(&Layers {
        env: env(&[("VLEMBED_NOPE__X", "1")]),
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("VLEMBED_NOPE__X"), "{err}");
}

#[test]
fn max_input_tokens_is_per_model_and_zero_means_the_models_default() {
    let file = write_file(
        "tokens.toml",
        r#"
        [model_defaults]
        max_input_tokens = 3500
        [[models]]
        name = "a"
        source = "org/a"
        [[models]]
        name = "b"
        source = "org/b"
        max_input_tokens = 8192
        [[models]]
        name = "c"
        source = "org/c"
        max_input_tokens = 0
        "#,
    );
    let c = Config::load(&Layers {
        file: Some(file.clone()),
        ..Default::default()
    })
    .unwrap();
    let tokens = |name: &str| c.model(name).unwrap().max_input_tokens;
    assert_eq!(tokens("a"), Some(3500));
    assert_eq!(tokens("b"), Some(8192));
    assert_eq!(tokens("c"), None);
    // Unset everywhere: the model's default.
    assert_eq!(
        ModelConfig::with_defaults("org/x")
            .unwrap()
            .max_input_tokens,
        None
    );
    // The environment sets it like any model_defaults key.
    let c = Config::load(&Layers {
        env: env(&[("VLEMBED_MODEL_DEFAULTS__MAX_INPUT_TOKENS", "5000")]),
        flags: Overrides {
            model: Some("org/x".into()),
            ..Default::default()
        },
        ..Default::default()
    })
    .unwrap();
    assert_eq!(c.models[0].max_input_tokens, Some(5000));
    let err = file_error(
        "tokens-bad.toml",
        "[[models]]\nsource = \"a/b\"\nmax_input_tokens = -1\n",
    );
    assert!(
        err.contains("max_input_tokens") || err.contains("-1"),
        "{err}"
    );
}

#[test]
fn prompt_format_and_pixel_bounds_are_per_model_and_empty_or_zero_means_the_models_own() {
    let file = write_file(
        "qwen.toml",
        r#"
        [[models]]
        name = "gme"
        source = "org/gme"
        prompt_format = " gme "
        min_pixels = 3136
        max_pixels = 200704
        [[models]]
        name = "plain"
        source = "org/plain"
        "#,
    );
    let c = Config::load(&Layers {
        file: Some(file),
        ..Default::default()
    })
    .unwrap();
    let gme = c.model("gme").unwrap();
    assert_eq!(gme.prompt_format.as_deref(), Some("gme"));
    assert_eq!((gme.min_pixels, gme.max_pixels), (Some(3136), Some(200704)));
    let plain = c.model("plain").unwrap();
    assert_eq!(
        (&plain.prompt_format, plain.min_pixels, plain.max_pixels),
        (&None, None, None)
    );
    let c = Config::load(&Layers {
        env: env(&[
            ("VLEMBED_MODEL_DEFAULTS__PROMPT_FORMAT", "screenshot"),
            ("VLEMBED_MODEL_DEFAULTS__MAX_PIXELS", "802816"),
        ]),
        flags: Overrides {
            model: Some("org/x".into()),
            ..Default::default()
        },
        ..Default::default()
    })
    .unwrap();
    assert_eq!(c.models[0].prompt_format.as_deref(), Some("screenshot"));
    assert_eq!(c.models[0].max_pixels, Some(802816));
    let err = file_error(
        "qwen-bad.toml",
        "[[models]]\nsource = \"a/b\"\nmin_pixels = 5000\nmax_pixels = 4000\n",
    );
    assert!(
        err.contains("min_pixels (5000) is above max_pixels (4000)"),
        "{err}"
    );
}

#[test]
fn env_values_are_toml_or_strings() {
    assert_eq!(env_value("12"), Value::Integer(12));
    assert_eq!(env_value("true"), Value::Boolean(true));
    assert_eq!(env_value("0.0.0.0"), Value::String("0.0.0.0".into()));
    assert_eq!(env_value("\"q\""), Value::String("q".into()));
    assert_eq!(
        DeviceSpec::parse_list("cpu, cuda:2").unwrap(),
        vec![DeviceSpec::Cpu, DeviceSpec::Cuda(2)]
    );
    assert!(DeviceSpec::parse_list(" , ").is_err());
}

#[test]
fn empty_key_lists_from_the_environment_are_errors() {
    for (name, value) in [
        ("VLEMBED_API_KEYS", ""),
        ("VLEMBED_API_KEYS", ","),
        ("VLEMBED_API_KEYS", " , "),
        ("VLEMBED_SERVER__API_KEYS", ""),
        ("VLEMBED_SERVER__API_KEYS", ","),
        ("VLEMBED_SERVER__API_KEYS", "[]"),
    ] {
        let layers = Layers {
            env: env(&[(name, value), ("VLEMBED_MODEL", "org/m")]),
            ..Default::default()
        };
        let err = Config::load(&layers).unwrap_err().to_string();
        assert!(
            err.contains(name) && err.contains("switch authentication off"),
            "{name}={value:?}: {err}"
        );
    }
    let mut c = Config::builtin().unwrap();
    let err = c
        .apply(Overrides {
            api_keys: Some(vec![]),
            ..Default::default()
        })
        .unwrap_err();
    assert!(err.to_string().contains("authentication off"), "{err}");
}

#[test]
fn connection_limits_are_validated() {
    let base = || {
        let mut c = Config::builtin().unwrap();
        c.models = vec![ModelConfig::with_defaults("org/m").unwrap()];
        c
    };
    assert!(base().validate().is_ok());
    let mut c = base();
    c.server.max_connections = 0;
    assert!(c
        .validate()
        .unwrap_err()
        .to_string()
        .contains("max_connections"));
    let mut c = base();
    c.server.max_buffered_body_bytes = c.server.max_body_bytes - 1;
    assert!(c.validate().is_err());
    let mut c = base();
    c.server.drain_delay_ms = c.server.shutdown_timeout_ms;
    assert!(c
        .validate()
        .unwrap_err()
        .to_string()
        .contains("drain_delay_ms"));
}

/// `cpu_backend`: `auto` by default, set per model in a file, for every
/// model by `VLEMBED_CPU_BACKEND` and by the flag (which wins); a bad
/// value names the variable and the choices.
#[test]
fn cpu_backend_layers() {
    let file = write_file(
        "cpu-backend.toml",
        "[[models]]\nname = \"a\"\nsource = \"org/a\"\ncpu_backend = \"native\"\n\
         [[models]]\nname = \"b\"\nsource = \"org/b\"\n",
    );
    let load = |env_pairs: &[(&str, &str)], flag: Option<CpuBackend>| {
        Config::load(&Layers {
            file: Some(file.clone()),
            env: env(env_pairs),
            flags: Overrides {
                cpu_backend: flag,
                ..Default::default()
            },
        })
    };
    let c = load(&[], None).unwrap();
    let got: Vec<CpuBackend> = c.models.iter().map(|m| m.cpu_backend).collect();
    assert_eq!(got, [CpuBackend::Native, CpuBackend::Auto]);
    let c = load(&[("VLEMBED_CPU_BACKEND", "onednn")], None).unwrap();
    assert!(c.models.iter().all(|m| m.cpu_backend == CpuBackend::Onednn));
    let c = load(
        &[("VLEMBED_CPU_BACKEND", "onednn")],
        Some(CpuBackend::Native),
    )
    .unwrap();
    assert!(c.models.iter().all(|m| m.cpu_backend == CpuBackend::Native));
    let err = load(&[("VLEMBED_CPU_BACKEND", "mkl")], None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("VLEMBED_CPU_BACKEND") && err.contains("auto, native or onednn"),
        "{err}"
    );
    let err = file_error(
        "cpu-backend-bad.toml",
        "[[models]]\nsource = \"org/a\"\ncpu_backend = \"gpu\"\n",
    );
    assert!(err.contains("auto, native or onednn"), "{err}");
}

#[test]
fn batch_and_pass_defaults_follow_the_devices_and_explicit_values_win() {
    use crate::config::auto::DeviceDefaults;
    use crate::models::DeviceClass;
    let load =
        |file_text: &str, flags: Overrides| load_file("auto-batching.toml", file_text, flags);
    let cuda = Overrides {
        devices: Some(vec![DeviceSpec::Cuda(0), DeviceSpec::Cuda(1)]),
        ..Default::default()
    };
    let one = "[[models]]\nsource = \"org/a\"\n";
    let cpu = &load(one, Overrides::default()).models[0];
    assert_eq!(cpu.device_class(), DeviceClass::Cpu);
    assert_eq!(
        cpu.batching.max_batch_size,
        DeviceDefaults::CPU.max_batch_size
    );
    assert_eq!(cpu.batching.max_batch_cost, 1024);
    assert_eq!(cpu.pass, crate::models::PassLimits::CPU);
    let gpu = &load(one, cuda.clone()).models[0];
    assert_eq!(gpu.device_class(), DeviceClass::Gpu);
    assert_eq!(
        (gpu.batching.max_batch_size, gpu.batching.max_batch_cost),
        (256, 65536)
    );
    // An MLLM image (~5,100) batches with others on a GPU.
    assert!(gpu.batching.max_batch_cost >= 2 * 5100);
    assert_eq!(gpu.pass, crate::models::PassLimits::GPU);
    assert_eq!(
        gpu.auto_keys(),
        vec![
            "dtype",
            "max_batch_size",
            "max_batch_cost",
            "decoder_group_tokens",
            "vision_tile_chunk"
        ]
    );
    // Explicit values win (file, model defaults, environment); the rest
    // still follow the devices.
    let fixed = load(
        "[model_defaults]\nvision_tile_chunk = 4\n[[models]]\nsource = \"org/a\"\nmax_batch_cost = 3000\n",
        cuda.clone(),
    );
    let m = &fixed.models[0];
    assert_eq!(m.batching.max_batch_cost, 3000);
    assert_eq!(m.pass.vision_tile_chunk, 4);
    assert_eq!(m.batching.max_batch_size, 256);
    assert_eq!(m.pass.decoder_group_tokens, 16384);
    assert!(!m.auto.max_batch_cost && m.auto.max_batch_size);
    let env_fixed = Config::load(&Layers {
        env: env(&[
            ("VLEMBED_MODEL", "org/a"),
            ("VLEMBED_MODEL_DEFAULTS__MAX_BATCH_SIZE", "12"),
            ("VLEMBED_MODEL_DEFAULTS__DECODER_GROUP_TOKENS", "auto"),
        ]),
        flags: cuda.clone(),
        ..Default::default()
    })
    .unwrap();
    let m = &env_fixed.models[0];
    assert_eq!(m.batching.max_batch_size, 12);
    assert_eq!(m.pass.decoder_group_tokens, 16384);
    // A model spread over CPU and GPU takes the CPU's values.
    let mixed = &load(
        "[[models]]\nsource = \"org/a\"\ndevices = [\"cpu\", \"cuda:0\"]\n",
        Overrides::default(),
    )
    .models[0];
    assert_eq!(mixed.batching.max_batch_cost, 1024);
    // Zero is not a size.
    let err = file_error(
        "zero-chunk.toml",
        "[[models]]\nsource = \"org/a\"\nvision_tile_chunk = 0\n",
    );
    assert!(err.contains("vision_tile_chunk"), "{err}");
}

#[test]
fn preprocess_threads_resolve_for_the_served_devices() {
    let mut c = Config::load(&Layers {
        flags: Overrides {
            model: Some("org/a".into()),
            ..Default::default()
        },
        ..Default::default()
    })
    .unwrap();
    assert_eq!(c.server.preprocess_threads, 0, "auto");
    assert_eq!(c.preprocess_threads_on(16), 4);
    c.apply(Overrides {
        devices: Some(vec![DeviceSpec::Cuda(0)]),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(c.preprocess_threads_on(16), 13);
    assert_eq!(c.preprocess_threads_on(2), 1);
    c.server.preprocess_threads = 3;
    assert_eq!(c.preprocess_threads_on(16), 3);
    // "auto" and 0 are both accepted in a layer.
    for v in ["\"auto\"", "0"] {
        let file = write_file(
            "threads.toml",
            &format!("[server]\npreprocess_threads = {v}\n"),
        );
        let c = Config::load(&Layers {
            file: Some(file),
            flags: Overrides {
                model: Some("org/a".into()),
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.server.preprocess_threads, 0);
    }
}

#[test]
fn the_resolved_toml_reloads_to_the_same_models() {
    let layers = Layers {
        env: env(&[
            ("VLEMBED_SERVER__ALLOW_TF32", "true"),
            ("VLEMBED_API_KEYS", "secret-key-1,secret-key-2"),
            ("VLEMBED_CPU_BACKEND", "native"),
            ("VLEMBED_MODEL_DEFAULTS__PROMPT_FORMAT", "gme"),
            ("VLEMBED_MODEL_DEFAULTS__MAX_PIXELS", "1003520"),
        ]),
        flags: Overrides {
            model: Some("/nonexistent/models/bge-vl-large".into()),
            devices: Some(vec![DeviceSpec::Cuda(0)]),
            ..Default::default()
        },
        ..Default::default()
    };
    let c = Config::load(&layers).unwrap();
    let text = c.to_resolved_toml_on(16).unwrap();
    assert!(
        text.contains("# server.preprocess_threads = 13 (auto for gpu on 16 cores)"),
        "{text}"
    );
    assert!(text.contains("auto: dtype, max_batch_size"), "{text}");
    assert!(text.contains("max_batch_cost = 65536"), "{text}");
    assert!(text.contains("dtype = \"bf16\""), "{text}");
    assert!(text.contains("allow_tf32 = true"), "{text}");
    assert!(text.contains("cpu_backend = \"native\""), "{text}");
    assert!(
        !text.contains("secret-key"),
        "API keys are never written: {text}"
    );
    assert!(text.contains("# server.api_keys: 2 keys set"), "{text}");
    let file = write_file("resolved.toml", &text);
    let again = Config::load(&Layers {
        file: Some(file),
        ..Default::default()
    })
    .unwrap();
    let (a, b) = (&c.models[0], &again.models[0]);
    assert_eq!(
        (
            &a.name,
            &a.source,
            a.dtype,
            &a.devices,
            a.batching,
            a.pass,
            a.cpu_backend
        ),
        (
            &b.name,
            &b.source,
            b.dtype,
            &b.devices,
            b.batching,
            b.pass,
            b.cpu_backend
        )
    );
    assert_eq!(
        (&a.prompt_format, a.min_pixels, a.max_pixels),
        (&b.prompt_format, b.min_pixels, b.max_pixels)
    );
    assert_eq!(b.prompt_format.as_deref(), Some("gme"));
    assert_eq!((b.min_pixels, b.max_pixels), (None, Some(1003520)));
    assert!(b.auto_keys().is_empty(), "every key is fixed in the output");
    assert_eq!(again.server.preprocess_threads, 13);
    assert!(again.server.allow_tf32);
    assert_eq!(again.fetch, c.fetch);
}
