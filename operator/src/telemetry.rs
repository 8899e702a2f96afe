//! Logs and traces of the long-running commands: JSON log lines on stderr (`RUST_LOG`
//! filters; default `info`), and — when an OTLP endpoint is given
//! (`OTEL_EXPORTER_OTLP_ENDPOINT`, read once by the CLI) — the same spans exported as
//! OpenTelemetry traces over OTLP/HTTP (protobuf) to `<endpoint>/v1/traces`, in batches
//! from a background thread, as service `apiward-operator`. The exporter is the `otlp`
//! feature (on in the operator image); without it an endpoint is refused with that reason.

#[cfg(feature = "otlp")]
use opentelemetry::trace::TracerProvider as _;
#[cfg(feature = "otlp")]
use opentelemetry_otlp::WithExportConfig as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Keeps the trace exporter alive; dropping it flushes the spans not sent yet.
#[derive(Debug, Default)]
pub struct Telemetry {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

#[cfg(feature = "otlp")]
impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("apiward: traces not all exported: {e}");
        }
    }
}

/// The OTLP/HTTP traces URL for an `OTEL_EXPORTER_OTLP_ENDPOINT` base.
pub fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    }
}

/// Installs the global subscriber: JSON logs, plus OTLP traces to `otlp` when given.
/// Call before starting a tokio runtime (the exporter's HTTP client has its own).
pub fn init(service: &str, otlp: Option<&str>) -> Result<Telemetry, String> {
    let otlp = otlp.filter(|e| !e.is_empty());
    #[cfg(feature = "otlp")]
    let provider = otlp
        .map(|endpoint| tracer_provider(service, endpoint))
        .transpose()?;
    #[cfg(feature = "otlp")]
    let traces = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("apiward")));
    #[cfg(not(feature = "otlp"))]
    let traces: Option<tracing_subscriber::layer::Identity> = match otlp {
        Some(e) => {
            return Err(format!(
                "cannot export traces of {service} to {e}: this apiward was built without the otlp feature (the operator image has it; cargo build --features otlp)"
            ));
        }
        None => None,
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt::layer()
        .json()
        .with_writer(std::io::stderr);
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(traces)
        .try_init();
    Ok(Telemetry {
        #[cfg(feature = "otlp")]
        provider,
    })
}

/// Spans batched to `<endpoint>/v1/traces` over OTLP/HTTP, as `service`.
#[cfg(feature = "otlp")]
fn tracer_provider(
    service: &str,
    endpoint: &str,
) -> Result<opentelemetry_sdk::trace::SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(traces_url(endpoint))
        .build()
        .map_err(|e| format!("OTLP exporter for {endpoint}: {e}"))?;
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service.to_owned())
                .build(),
        )
        .build())
}
