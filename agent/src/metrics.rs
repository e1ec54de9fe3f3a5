//! Prometheus families whose values live in a component's own counters and are read when `/metrics` is
//! scraped. Each component builds its set and registers it once, when the process builds the component
//! ([`crate::ingest::IngestMetrics::register`], [`crate::stream::StreamStats::register`],
//! [`crate::controller::ControllerStats::register`], the leader term's gauges); components shared by every
//! leader term keep counting across terms, so nothing has to fold or copy values.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

type ReadValue = Box<dyn Fn() -> u64 + Send + Sync>;
type ReadLabelled = Box<dyn Fn() -> Vec<(String, u64)> + Send + Sync>;

enum Read {
    Counter(ReadValue),
    CounterByLabel(String, ReadLabelled),
    Gauge(Box<dyn Fn() -> i64 + Send + Sync>),
}

struct Family {
    opts: Opts,
    read: Read,
}

/// A set of families read at scrape time. Build it with [`ScrapedFamilies::counter`] and friends, then
/// [`ScrapedFamilies::register`] it.
#[derive(Default)]
pub struct ScrapedFamilies {
    descs: Vec<Desc>,
    families: Vec<Family>,
}

impl ScrapedFamilies {
    pub fn new() -> Self {
        Self::default()
    }

    fn push(
        mut self,
        name: &str,
        help: &str,
        labels: &[&str],
        read: Read,
    ) -> Result<Self, prometheus::Error> {
        let opts = Opts::new(name, help);
        let desc = Desc::new(
            name.to_owned(),
            help.to_owned(),
            labels.iter().map(|l| (*l).to_owned()).collect(),
            Default::default(),
        )?;
        self.descs.push(desc);
        self.families.push(Family { opts, read });
        Ok(self)
    }

    /// A counter whose value `read` returns (it only grows).
    pub fn counter(
        self,
        name: &str,
        help: &str,
        read: impl Fn() -> u64 + Send + Sync + 'static,
    ) -> Result<Self, prometheus::Error> {
        self.push(name, help, &[], Read::Counter(Box::new(read)))
    }

    /// A counter with one label; `read` returns the value of every label value.
    pub fn counter_by(
        self,
        name: &str,
        help: &str,
        label: &str,
        read: impl Fn() -> Vec<(String, u64)> + Send + Sync + 'static,
    ) -> Result<Self, prometheus::Error> {
        self.push(
            name,
            help,
            &[label],
            Read::CounterByLabel(label.to_owned(), Box::new(read)),
        )
    }

    /// A gauge whose value `read` returns.
    pub fn gauge(
        self,
        name: &str,
        help: &str,
        read: impl Fn() -> i64 + Send + Sync + 'static,
    ) -> Result<Self, prometheus::Error> {
        self.push(name, help, &[], Read::Gauge(Box::new(read)))
    }

    /// Registers the set; its families then appear in every scrape of `registry`.
    pub fn register(self, registry: &Registry) -> Result<(), prometheus::Error> {
        registry.register(Box::new(self))
    }
}

impl Collector for ScrapedFamilies {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        // The names and labels were validated by `Desc::new` when the set was built.
        const VALID: &str = "validated when the set was built";
        let mut out = Vec::with_capacity(self.families.len());
        for family in &self.families {
            match &family.read {
                Read::Counter(read) => {
                    let counter = IntCounter::with_opts(family.opts.clone()).expect(VALID);
                    counter.inc_by(read());
                    out.extend(counter.collect());
                }
                Read::CounterByLabel(label, read) => {
                    let vec =
                        IntCounterVec::new(family.opts.clone(), &[label.as_str()]).expect(VALID);
                    for (value, count) in read() {
                        vec.with_label_values(&[value.as_str()]).inc_by(count);
                    }
                    out.extend(vec.collect());
                }
                Read::Gauge(read) => {
                    let gauge = IntGauge::with_opts(family.opts.clone()).expect(VALID);
                    gauge.set(read());
                    out.extend(gauge.collect());
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn scrapes_read_the_current_values() {
        let registry = Registry::new_custom(Some("test".into()), None).unwrap();
        let count = Arc::new(AtomicU64::new(0));
        let read = Arc::clone(&count);
        ScrapedFamilies::new()
            .counter("things_total", "Things", move || {
                read.load(Ordering::Relaxed)
            })
            .unwrap()
            .counter_by("items_total", "Items", "kind", || vec![("a".into(), 2)])
            .unwrap()
            .gauge("level", "Level", || -3)
            .unwrap()
            .register(&registry)
            .unwrap();
        count.store(7, Ordering::Relaxed);
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap();
        assert!(text.contains("test_things_total 7"), "{text}");
        assert!(text.contains("test_items_total{kind=\"a\"} 2"), "{text}");
        assert!(text.contains("test_level -3"), "{text}");
        count.store(9, Ordering::Relaxed);
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap();
        assert!(text.contains("test_things_total 9"), "{text}");
    }

    #[test]
    fn a_family_registered_twice_is_refused() {
        let registry = Registry::new();
        let set = || {
            ScrapedFamilies::new()
                .counter("dup_total", "Dup", || 0)
                .unwrap()
        };
        set().register(&registry).unwrap();
        assert!(set().register(&registry).is_err());
    }
}
