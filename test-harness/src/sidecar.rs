//! The sidecar next to an agent, in-process: the agent's own fake Workload API (its
//! SVID, the gateway's bundle) and `egress_gateway::sidecar` on 127.0.0.1:0.

use std::net::SocketAddr;

use egress_gateway::sidecar::{self, RunningSidecar, SidecarConfig};

use crate::gateway::{World, GATEWAY_ID};
use crate::workload_api::{FakeWorkloadApi, WorkloadIdentity};

/// A running sidecar and the Workload API it takes the agent's SVID from.
pub struct TestSidecar {
    pub api: FakeWorkloadApi,
    sidecar: Option<RunningSidecar>,
    spiffe_id: String,
}

impl TestSidecar {
    /// A sidecar for `spiffe_id` in `world`, forwarding to its gateway.
    pub async fn start(world: &World, spiffe_id: &str) -> anyhow::Result<TestSidecar> {
        Self::start_with(world, spiffe_id, GATEWAY_ID, |_| {}).await
    }

    /// Like [`TestSidecar::start`], expecting `gateway_id` and with `tweak` applied to
    /// the configuration.
    pub async fn start_with(
        world: &World,
        spiffe_id: &str,
        gateway_id: &str,
        tweak: impl FnOnce(&mut SidecarConfig),
    ) -> anyhow::Result<TestSidecar> {
        let api = FakeWorkloadApi::start_in_tempdir(WorkloadIdentity::single(&world.ca, spiffe_id))
            .await?;
        let mut config = SidecarConfig::new(
            world.gateway.proxy_addr().to_string(),
            gateway_id.parse()?,
            api.endpoint(),
        );
        config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.admin = SocketAddr::from(([127, 0, 0, 1], 0));
        config.startup_timeout = std::time::Duration::from_secs(20);
        config.shutdown_grace = std::time::Duration::from_secs(2);
        tweak(&mut config);
        let sidecar = sidecar::start(config).await?;
        Ok(TestSidecar {
            api,
            sidecar: Some(sidecar),
            spiffe_id: spiffe_id.to_string(),
        })
    }

    fn running(&self) -> &RunningSidecar {
        // Only `shutdown` takes it, and that consumes self.
        self.sidecar.as_ref().expect("sidecar is running")
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.running().listen_addr()
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.running().admin_addr()
    }

    /// `http://127.0.0.1:PORT`, the value for `HTTP_PROXY`/`HTTPS_PROXY`.
    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.listen_addr())
    }

    pub fn running_sidecar(&self) -> &RunningSidecar {
        self.running()
    }

    /// A fresh SVID for the agent through its Workload API (rotation).
    pub fn rotate(&self, ca: &crate::ca::TestCa) {
        self.api
            .update(WorkloadIdentity::single(ca, &self.spiffe_id));
    }

    pub async fn shutdown(mut self) {
        if let Some(s) = self.sidecar.take() {
            s.shutdown().await;
        }
        self.api.shutdown().await;
    }
}

/// `GET path` on an admin port: (status, body).
pub use crate::gateway::admin_get;
