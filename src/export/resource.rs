//! The OTLP `Resource`: what describes this varnishd in every export.

use std::sync::OnceLock;

use crate::config::{key_values, Settings};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resource {
    /// String-valued attributes, in a stable order (user-given first).
    pub attributes: Vec<(String, String)>,
}

/// `service.instance.id`: a random UUID (version 4) per process, as the semantic conventions
/// recommend when nothing better identifies the instance; stable across VCL reloads.
fn instance_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let mut b: [u8; 16] = fastrand::u128(..).to_be_bytes();
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
        format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
    })
}

impl Resource {
    /// `OTEL_RESOURCE_ATTRIBUTES`, then `OTEL_SERVICE_NAME` (which wins for `service.name`), then
    /// what we know of the process where the user gave nothing.
    pub fn from_settings(s: &Settings) -> Result<Self, String> {
        let mut attributes = match s.get("OTEL_RESOURCE_ATTRIBUTES") {
            Some(text) => key_values("OTEL_RESOURCE_ATTRIBUTES", &text)?,
            None => Vec::new(),
        };
        if let Some(name) = s.get("OTEL_SERVICE_NAME") {
            attributes.retain(|(k, _)| k != "service.name");
            attributes.insert(0, ("service.name".to_owned(), name));
        }
        let mut add = |k: &str, v: String| {
            if !attributes.iter().any(|(key, _)| key == k) {
                attributes.push((k.to_owned(), v));
            }
        };
        add("service.name", "varnish".to_owned());
        add("service.instance.id", instance_id().to_owned());
        if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
            add("host.name", host.trim().to_owned());
        }
        add("telemetry.sdk.name", "vmod-opentracing".to_owned());
        add("telemetry.sdk.language", "rust".to_owned());
        add("telemetry.sdk.version", env!("CARGO_PKG_VERSION").to_owned());
        add("varnish.version", env!("VARNISH_API_VERSION").to_owned());
        // varnishd runs in its instance's working directory, named after the instance (`-n`).
        if let Some(name) =
            std::env::current_dir().ok().and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        {
            add("varnish.instance.name", name);
        }
        Ok(Resource { attributes })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_name_defaults_to_varnish_and_the_setting_wins() {
        let r = Resource::from_settings(&Settings::only(&[]).unwrap()).unwrap();
        assert_eq!(r.get("service.name"), Some("varnish"));
        assert_eq!(r.get("telemetry.sdk.language"), Some("rust"));
        assert!(r.get("varnish.version").is_some_and(|v| !v.is_empty()));
        let id = r.get("service.instance.id").unwrap();
        assert_eq!((id.len(), &id[14..15]), (36, "4"), "{id}");
        let r = Resource::from_settings(
            &Settings::only(&[
                ("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attrs,deployment.environment.name=prod%2Feu"),
                ("OTEL_SERVICE_NAME", "edge"),
            ])
            .unwrap(),
        )
        .unwrap();
        assert_eq!(r.get("service.name"), Some("edge"));
        assert_eq!(r.get("deployment.environment.name"), Some("prod/eu"));
        assert_eq!(r.attributes.iter().filter(|(k, _)| k == "service.name").count(), 1);
        // The instance ID is the process's: the same for every VCL.
        assert_eq!(r.get("service.instance.id"), Some(id));
    }

    #[test]
    fn malformed_attributes_fail_with_the_setting_name() {
        let e = Resource::from_settings(&Settings::only(&[("OTEL_RESOURCE_ATTRIBUTES", "oops")]).unwrap()).unwrap_err();
        assert!(e.starts_with("OTEL_RESOURCE_ATTRIBUTES"), "{e}");
    }
}
