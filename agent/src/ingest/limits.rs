//! Budgets that protect the API server from the agent (the seed's `informerCaps`):
//!
//! - a request rate per watched type: every watch gets its own client whose requests (list pages, watch
//!   (re)starts, relists) first take a token from a bucket of `qps` per second and `burst` at once, like client-go's
//!   per-client limiter; a type that keeps failing or relisting cannot flood the API server, and the others are not
//!   slowed by it;
//! - a cap on initial lists in flight: a list (or relist) holds one of `max_concurrent_lists` permits from the
//!   watcher's `Init` to its `InitDone`, so a start over hundreds of types lists them a few dozen at a time.

use std::sync::Arc;

use reverser_common::rate::TokenBucket;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Request rate per watched type.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RequestRate {
    /// Sustained requests per second; 0 or less means unlimited.
    pub qps: f64,
    /// Requests that may be made at once above the rate.
    pub burst: u32,
}

impl Default for RequestRate {
    /// The seed's defaults: qps 5, burst 10.
    fn default() -> Self {
        Self {
            qps: 5.0,
            burst: 10,
        }
    }
}

/// A client sharing `client`'s connection and credentials whose every request first waits for a token of its own
/// bucket (one bucket per returned client).
pub fn rate_limited_client(client: &kube::Client, rate: RequestRate) -> kube::Client {
    if rate.qps <= 0.0 || !rate.qps.is_finite() {
        return client.clone();
    }
    let bucket = Arc::new(TokenBucket::new());
    let inner = client.clone();
    let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
        let inner = inner.clone();
        let bucket = Arc::clone(&bucket);
        async move {
            bucket.take(rate.qps, f64::from(rate.burst)).await;
            inner.send(request).await
        }
    });
    kube::Client::new(service, client.default_namespace().to_owned())
}

/// Permits for lists in flight, shared by every watch of the agent.
#[derive(Clone, Debug)]
pub struct ListPermits {
    semaphore: Arc<Semaphore>,
    capacity: usize,
}

impl ListPermits {
    /// At most `capacity` lists at once (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            semaphore: Arc::new(Semaphore::new(capacity)),
            capacity,
        }
    }

    /// Waits for a permit; the list may proceed while it is held.
    pub async fn acquire(&self) -> OwnedSemaphorePermit {
        Arc::clone(&self.semaphore)
            .acquire_owned()
            .await
            .expect("the list semaphore is never closed")
    }

    /// Lists in flight now.
    pub fn in_flight(&self) -> usize {
        self.capacity - self.semaphore.available_permits()
    }
}

impl Default for ListPermits {
    /// The seed's `maxConcurrentInformers`: 50.
    fn default() -> Self {
        Self::new(50)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn list_permits_cap_lists_in_flight() {
        let permits = ListPermits::new(2);
        let first = permits.acquire().await;
        let _second = permits.acquire().await;
        assert_eq!(permits.in_flight(), 2);
        let waiting = tokio::spawn({
            let permits = permits.clone();
            async move {
                let _third = permits.acquire().await;
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "a third list waits for a permit");
        drop(first);
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the third list proceeds once a permit is free")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_limited_client_spends_its_burst_then_waits_for_the_rate() {
        // A tower-test mock stands in for the API server: only the pacing of requests is under test.
        let (mock, mut handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let base = kube::Client::new(mock, "default");
        let served = Arc::new(AtomicUsize::new(0));
        let server = tokio::spawn({
            let served = Arc::clone(&served);
            async move {
                while let Some((_request, send)) = handle.next_request().await {
                    served.fetch_add(1, Ordering::SeqCst);
                    send.send_response(
                        http::Response::builder()
                            .body(kube::client::Body::from(b"{}".to_vec()))
                            .unwrap(),
                    );
                }
            }
        });
        let client = rate_limited_client(&base, RequestRate { qps: 2.0, burst: 3 });
        let requests = tokio::spawn(async move {
            for _ in 0..5 {
                let request = http::Request::get("/api/v1/namespaces")
                    .body(Vec::new())
                    .unwrap();
                let _: serde_json::Value = client.request(request).await.unwrap();
            }
        });
        // The paused clock only moves when every task waits: the burst goes out at once, then one per 500 ms.
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(served.load(Ordering::SeqCst), 3);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(served.load(Ordering::SeqCst), 4);
        tokio::time::sleep(Duration::from_millis(500)).await;
        requests.await.unwrap();
        assert_eq!(served.load(Ordering::SeqCst), 5);
        server.abort();
    }
}
