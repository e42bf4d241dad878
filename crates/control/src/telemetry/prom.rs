//! Prometheus exposition of the newest sample, by hand (one writer, no dependency): the text
//! format 0.0.4 and OpenMetrics 1.0.
//!
//! GPU series carry the DCGM exporter's names, units and labels (`gpu`, `UUID`, `device`,
//! `modelName`, `Hostname`, `pci_bus_id`), so dashboards built for dcgm-exporter work unchanged;
//! simulated GPUs add `simulated="true"`. DCGM's counters keep their names in OpenMetrics too
//! (typed `unknown` there, since OpenMetrics would demand a `_total` suffix that would break
//! those dashboards). Per-instance series are `gpuvisor_instance_*` with `instance` and `tenant`.

use std::fmt::Write;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Gauge,
    Counter,
}

/// The two formats `/metrics` answers in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text004,
    OpenMetrics,
}

impl Format {
    /// Picks the format from an `Accept` header: OpenMetrics only when asked for.
    pub fn from_accept(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Self::OpenMetrics,
            _ => Self::Text004,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Text004 => "text/plain; version=0.0.4; charset=utf-8",
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Writes metric families: a header once, then samples.
pub struct Writer {
    pub out: String,
    format: Format,
}

impl Writer {
    pub fn new(format: Format) -> Self {
        Self {
            out: String::with_capacity(64 * 1024),
            format,
        }
    }

    /// `name` is the sample name (counters of ours end in `_total`).
    pub fn family(&mut self, name: &str, help: &str, kind: Kind) {
        let (fam, ty) = match (self.format, kind) {
            (_, Kind::Gauge) => (name, "gauge"),
            (Format::Text004, Kind::Counter) => (name, "counter"),
            (Format::OpenMetrics, Kind::Counter) => match name.strip_suffix("_total") {
                Some(base) => (base, "counter"),
                None => (name, "unknown"),
            },
        };
        let _ = writeln!(self.out, "# HELP {fam} {help}");
        let _ = writeln!(self.out, "# TYPE {fam} {ty}");
    }

    /// One sample; non-finite values are left out (a missing reading is no sample).
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        if !value.is_finite() {
            return;
        }
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                escape_into(&mut self.out, v);
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    pub fn finish(mut self) -> String {
        if self.format == Format::OpenMetrics {
            self.out.push_str("# EOF\n");
        }
        self.out
    }
}

fn escape_into(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn text_and_openmetrics() {
        let mut w = Writer::new(Format::Text004);
        w.family("x_total", "help", Kind::Counter);
        w.sample("x_total", &[("a", "q\"\\\n")], 3.0);
        w.sample("x_total", &[], f64::NAN);
        assert_eq!(
            w.finish(),
            "# HELP x_total help\n# TYPE x_total counter\nx_total{a=\"q\\\"\\\\\\n\"} 3\n"
        );
        let mut w = Writer::new(Format::OpenMetrics);
        w.family("x_total", "h", Kind::Counter);
        w.family("DCGM_FI_DEV_PCIE_TX_THROUGHPUT", "h", Kind::Counter);
        w.sample("y", &[], 0.5);
        assert_eq!(
            w.finish(),
            "# HELP x h\n# TYPE x counter\n# HELP DCGM_FI_DEV_PCIE_TX_THROUGHPUT h\n# TYPE DCGM_FI_DEV_PCIE_TX_THROUGHPUT unknown\ny 0.5\n# EOF\n"
        );
        assert_eq!(
            Format::from_accept(Some("application/openmetrics-text;version=1.0.0")),
            Format::OpenMetrics
        );
        assert_eq!(Format::from_accept(Some("*/*")), Format::Text004);
    }
}
