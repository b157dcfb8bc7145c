//! The two exposition formats `/metrics` serves, chosen by `Accept`.
//!
//! `prometheus-client` encodes OpenMetrics 1.0. Scrapers that accept it
//! (Prometheus sends `Accept: application/openmetrics-text;…`) get it as is;
//! everyone else (curl, promtool 2.x, older agents) gets the classic
//! Prometheus text format 0.0.4, converted from the same encoding. The two
//! differ, for what this registry emits, in three places only:
//!
//! * a counter family is named without `_total` in OpenMetrics (`# TYPE x
//!   counter`, samples `x_total`), but must name the sample in 0.0.4
//!   (`# TYPE x_total counter`), or promtool reports "no help text";
//! * `# UNIT` lines and the closing `# EOF` do not exist in 0.0.4;
//! * OpenMetrics escapes `"` in HELP text, 0.0.4 does not.

/// `Content-Type` of the OpenMetrics exposition.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of the Prometheus text format.
pub const PROMETHEUS_TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Which format a scraper gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    PrometheusText,
}

impl Format {
    /// OpenMetrics when `Accept` lists `application/openmetrics-text` with a
    /// non-zero q; the Prometheus text format otherwise (no header, `*/*`,
    /// `text/plain`).
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::PrometheusText;
        };
        let om = accept.split(',').any(|range| {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("");
            if !media.eq_ignore_ascii_case("application/openmetrics-text") {
                return false;
            }
            // A q of 0 means "not acceptable".
            !parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            })
        });
        if om {
            Format::OpenMetrics
        } else {
            Format::PrometheusText
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
            Format::PrometheusText => PROMETHEUS_TEXT_CONTENT_TYPE,
        }
    }
}

/// Converts `prometheus-client`'s OpenMetrics text to Prometheus text 0.0.4.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // The counter families seen so far: their HELP lines come before TYPE.
    let counters = counter_families(openmetrics);
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = counter_name(name, &counters);
            out.push_str(&format!("# HELP {name} {}\n", help.replace("\\\"", "\"")));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = counter_name(name, &counters);
            out.push_str(&format!("# TYPE {name} {ty}\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Names of the families whose `# TYPE` is `counter`.
fn counter_families(text: &str) -> Vec<&str> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|r| r.strip_suffix(" counter"))
        .collect()
}

/// A counter family's name as 0.0.4 wants it (the sample name).
fn counter_name(name: &str, counters: &[&str]) -> String {
    if counters.contains(&name) && !name.ends_with("_total") {
        format!("{name}_total")
    } else {
        name.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiates_by_accept() {
        assert_eq!(Format::negotiate(None), Format::PrometheusText);
        assert_eq!(Format::negotiate(Some("*/*")), Format::PrometheusText);
        assert_eq!(
            Format::negotiate(Some("text/plain;version=0.0.4")),
            Format::PrometheusText
        );
        // What Prometheus 2.x sends.
        let prom = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prom)), Format::OpenMetrics);
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text; q=0, text/plain")),
            Format::PrometheusText
        );
    }

    #[test]
    fn renames_counters_and_drops_openmetrics_only_lines() {
        let om = "# HELP x_requests Requests \\\"done\\\".\n# TYPE x_requests counter\n\
                  x_requests_total{class=\"2xx\"} 3\n# HELP x_up Up.\n# TYPE x_up gauge\n\
                  # UNIT x_up seconds\nx_up 1\n# EOF\n";
        let text = to_prometheus_text(om);
        assert_eq!(
            text,
            "# HELP x_requests_total Requests \"done\".\n# TYPE x_requests_total counter\n\
             x_requests_total{class=\"2xx\"} 3\n# HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\n"
        );
    }
}
