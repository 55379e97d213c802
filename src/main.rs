//! The `vlembed` command line: `serve` (the HTTP server, the default),
//! `config` (the resolved configuration, printed as TOML), `embed` (one
//! input, printed as JSON) and `probe` (the startup probes, written as a
//! golden-vectors file).
//!
//! Owns argument parsing, logging setup, the tokio runtime and OS signals;
//! the server itself is [`vlembed::app`], configured by [`vlembed::config`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use vlembed::config::{Config, Layers, Overrides};
use vlembed::embedder::Embedder;
use vlembed::input::{Content, Input, Role};
use vlembed::models::{
    CpuBackend, DeviceClass, DeviceSpec, LoadOptions, ModelSource, PassLimits, Precision,
};

#[derive(Parser)]
#[command(
    name = "vlembed",
    version,
    about = "Serves the BGE-VL vision-language embedding models",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, global = true, env = "VLEMBED_JSON_LOGS")]
    json_logs: bool,
    #[command(subcommand)]
    command: Option<Command>,
    /// With no subcommand, `vlembed` runs `serve` with these arguments.
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP server (the default command).
    Serve(ServeArgs),
    /// Print the configuration `serve` would run with these arguments, every
    /// "auto" key resolved for the devices, as TOML; opens no device, reads
    /// no model file and touches no network.
    Config(ServeArgs),
    /// Embed one input and print {"model", "dimensions", "embedding"} on stdout.
    Embed(EmbedArgs),
    /// Embed the built-in startup probes and write them as a golden-vectors
    /// file (the `golden_vectors` model setting reads it).
    Probe(ProbeArgs),
}

#[derive(Args)]
struct ProbeArgs {
    /// A Hub id (BAAI/BGE-VL-base) or a local directory in the Hub layout.
    #[arg(long)]
    model: String,
    /// Hub revision (branch, tag or commit).
    #[arg(long)]
    revision: Option<String>,
    /// Largest allowed difference of one component of a normalised probe
    /// vector when the server compares its probes with this file.
    #[arg(long, default_value_t = vlembed::probe::DEFAULT_TOLERANCE)]
    tolerance: f32,
    /// Where to write the golden file (JSON); `-` for stdout.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    model_settings: ModelSettings,
}

/// How the commands that load one model without a configuration (`embed`,
/// `probe`) load it: the device, the precision and the CPU backend, and the
/// per-model settings that decide its vectors (a golden file must be
/// written with the served model's settings).
#[derive(Args)]
struct ModelSettings {
    #[arg(long, default_value = "f32")]
    dtype: Precision,
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// What the CPU matrix products run on: auto, native or onednn.
    #[arg(long, env = "VLEMBED_CPU_BACKEND", default_value = "auto")]
    cpu_backend: CpuBackend,
    /// Prompt format of a Qwen2-VL model: chat-template, screenshot or gme
    /// (default: by Hub id, else chat-template).
    #[arg(long)]
    prompt_format: Option<String>,
    /// Least pixels a Qwen2-VL image is resized to (default: the model's).
    #[arg(long)]
    min_pixels: Option<u64>,
    /// Most pixels a Qwen2-VL image is resized to (default: the model's).
    #[arg(long)]
    max_pixels: Option<u64>,
}

impl ModelSettings {
    /// The load options of the model on its device.
    fn load_options(&self) -> LoadOptions {
        LoadOptions {
            dtype: self.dtype,
            cpu_backend: self.cpu_backend,
            pass: PassLimits::for_class(DeviceClass::of(&[self.device])),
            prompt_format: self.prompt_format.clone(),
            min_pixels: self.min_pixels,
            max_pixels: self.max_pixels,
            ..Default::default()
        }
    }
}

#[derive(Args, Default)]
struct ServeArgs {
    /// A TOML configuration file (see config/default.toml for every key).
    #[arg(long, env = "VLEMBED_CONFIG")]
    config: Option<PathBuf>,
    /// Serve this one model (a Hub id or a local directory) instead of the
    /// config file's [[models]].
    #[arg(long)]
    model: Option<String>,
    /// The served model's name (default: the Hub id or the directory name).
    #[arg(long)]
    model_name: Option<String>,
    /// Hub revision (branch, tag or commit) of every served model.
    #[arg(long)]
    revision: Option<String>,
    /// Address to listen on.
    #[arg(long)]
    host: Option<String>,
    /// Port to listen on.
    #[arg(long)]
    port: Option<u16>,
    /// Devices of every served model, comma separated: cpu, cuda:0, cuda:1, ...
    #[arg(long, value_parser = parse_devices)]
    devices: Option<Devices>,
    /// Weight precision of every served model.
    #[arg(long)]
    dtype: Option<Precision>,
    /// What every served model's CPU matrix products run on: auto (measured
    /// at load), native or onednn.
    #[arg(long)]
    cpu_backend: Option<CpuBackend>,
    /// Export traces over OTLP/HTTP to this endpoint (e.g. http://collector:4318).
    #[arg(long)]
    otlp_endpoint: Option<String>,
}

#[derive(Clone)]
struct Devices(Vec<DeviceSpec>);

fn parse_devices(s: &str) -> Result<Devices, vlembed::models::BadDevice> {
    DeviceSpec::parse_list(s).map(Devices)
}

#[derive(Args)]
struct EmbedArgs {
    /// A Hub id (BAAI/BGE-VL-base) or a local directory in the Hub layout.
    #[arg(long)]
    model: String,
    /// The model's name in the output (default: the Hub id or directory name).
    #[arg(long)]
    model_name: Option<String>,
    /// Hub revision (branch, tag or commit).
    #[arg(long)]
    revision: Option<String>,
    #[arg(long)]
    text: Option<String>,
    /// Path of an image file.
    #[arg(long)]
    image: Option<PathBuf>,
    #[arg(long)]
    instruction: Option<String>,
    #[arg(long, default_value = "candidate")]
    role: Role,
    /// Return the unnormalised embedding.
    #[arg(long)]
    no_normalize: bool,
    /// Refuse texts over the model's token limit instead of truncating them.
    #[arg(long)]
    no_truncate: bool,
    #[command(flatten)]
    model_settings: ModelSettings,
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VLEMBED_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn embed(args: EmbedArgs) -> anyhow::Result<()> {
    let image = match &args.image {
        Some(p) => {
            Some(std::fs::read(p).with_context(|| format!("cannot read image {}", p.display()))?)
        }
        None => None,
    };
    let content = Content::from_parts(args.text, image).context("give --text, --image or both")?;
    let source = ModelSource::parse(&args.model, args.revision.as_deref());
    let name = args
        .model_name
        .clone()
        .unwrap_or_else(|| source.default_name());
    let opts = args.model_settings.load_options();
    let started = std::time::Instant::now();
    let embedder = Embedder::load(&source, args.model_settings.device, &opts)
        .with_context(|| format!("cannot load model {}", source.describe()))?;
    tracing::info!(model = %source.describe(), seconds = started.elapsed().as_secs_f64(), "model loaded");
    let input = Input::new(content)
        .with_role(args.role)
        .with_instruction(args.instruction);
    let started = std::time::Instant::now();
    let mut out = embedder.embed(&[input], !args.no_normalize, !args.no_truncate)?;
    let embedding = out.pop().context("the model returned no embedding")?;
    tracing::info!(seconds = started.elapsed().as_secs_f64(), "input embedded");
    let json = serde_json::json!({
        "model": name,
        "dimensions": embedding.len(),
        "embedding": embedding,
    });
    println!("{json}");
    Ok(())
}

fn probe(args: ProbeArgs) -> anyhow::Result<()> {
    if !(args.tolerance.is_finite() && args.tolerance >= 0.0) {
        anyhow::bail!("--tolerance must be a finite number >= 0");
    }
    let source = ModelSource::parse(&args.model, args.revision.as_deref());
    let opts = args.model_settings.load_options();
    let embedder = Embedder::load(&source, args.model_settings.device, &opts)
        .with_context(|| format!("cannot load model {}", source.describe()))?;
    let info = embedder.info();
    let prepared = vlembed::probe::prepare(&*embedder.loaded.preprocessor, info.uses_instructions)?;
    let results = vlembed::probe::embed(&prepared, |p| embedder.embed_prepared(&[p], false))?;
    for r in &results {
        tracing::info!(probe = r.name, digest = %r.digest, "probe embedded");
    }
    let golden = vlembed::probe::GoldenFile::new(
        &source.describe(),
        &info.fingerprint,
        args.tolerance,
        &results,
    );
    let json = serde_json::to_string_pretty(&golden)?;
    if args.out.as_os_str() == "-" {
        println!("{json}");
    } else {
        std::fs::write(&args.out, json + "\n")
            .with_context(|| format!("cannot write {}", args.out.display()))?;
        tracing::info!(out = %args.out.display(), fingerprint = %info.fingerprint, "golden vectors written");
    }
    Ok(())
}

/// The configuration of `serve` and `config`: every layer, validated.
fn load_config(args: ServeArgs) -> anyhow::Result<Config> {
    let flags = Overrides {
        host: args.host,
        port: args.port,
        api_keys: None,
        model: args.model,
        model_name: args.model_name,
        revision: args.revision,
        devices: args.devices.map(|d| d.0),
        dtype: args.dtype,
        cpu_backend: args.cpu_backend,
        otlp_endpoint: args.otlp_endpoint,
    };
    Ok(Config::load(&Layers::from_process_env(args.config, flags))?)
}

/// `vlembed config`: the resolved configuration on stdout.
fn print_config(args: ServeArgs) -> anyhow::Result<()> {
    let config = load_config(args)?;
    print!("{}", config.to_resolved_toml()?);
    Ok(())
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = load_config(args)?;
    for m in &config.models {
        tracing::info!(
            model = %m.name,
            source = %m.source,
            dtype = %m.dtype,
            cpu_backend = %m.cpu_backend,
            devices = ?m.devices.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
            class = m.device_class().as_str(),
            max_batch_size = m.batching.max_batch_size,
            max_batch_cost = m.batching.max_batch_cost,
            auto = ?m.auto_keys(),
            "configured model"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("vlembed-http")
        .build()
        .context("cannot start the async runtime")?;
    let shutdown_timeout = config.server.shutdown_timeout();
    let signalled: Arc<Mutex<Option<Instant>>> = Arc::default();
    let signal_at = Arc::clone(&signalled);
    let served = runtime.block_on(async {
        let server = vlembed::app::start(config, vlembed::app::Hooks::default()).await?;
        let trigger = server.shutdown_trigger();
        tokio::spawn(async move {
            shutdown_signal().await;
            *signal_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            trigger.shutdown();
            // A second signal means: stop now.
            shutdown_signal().await;
            tracing::warn!("second signal: exiting at once");
            std::process::exit(130);
        });
        server.wait().await
    });
    // Preprocessing jobs still running on blocking threads get what is left
    // of the shutdown budget, not more.
    let started = signalled
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .unwrap_or_else(Instant::now);
    let left = shutdown_timeout.saturating_sub(started.elapsed());
    runtime.shutdown_timeout(left.max(Duration::from_millis(100)));
    served?;
    Ok(())
}

/// Resolves on ctrl-c or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("ctrl-c received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.json_logs);
    let result = match cli.command {
        Some(Command::Embed(args)) => embed(args),
        Some(Command::Probe(args)) => probe(args),
        Some(Command::Serve(args)) => serve(args),
        Some(Command::Config(args)) => print_config(args),
        None => serve(cli.serve),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
