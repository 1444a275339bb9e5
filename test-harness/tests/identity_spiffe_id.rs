//! `identity.spiffe_id`: a workload registered under several entries gets several SVIDs
//! (real SPIRE orders them by entry ID), and the gateway must serve as its own one.

use test_harness::ca::TestCa;
use test_harness::gateway::{GatewayOptions, TestGateway, GATEWAY_ID};
use test_harness::workload_api::{FakeWorkloadApi, WorkloadIdentity};

const RESEARCH: &str = "spiffe://example.org/ns/ai-workloads/sa/research-agent";
const POLICY: &str = "version: 1\ntrust_domains: [example.org]\nagents: []\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_the_svid_named_in_its_config_not_the_first() {
    let ca = TestCa::new("example.org");
    let mut identity = test_harness::gateway::gateway_identity(&ca);
    // Another entry's SVID first, as SPIRE may list it.
    identity.svids.insert(0, ca.mint_svid(RESEARCH));
    let api = FakeWorkloadApi::start_in_tempdir(WorkloadIdentity { ..identity })
        .await
        .unwrap();

    let named = TestGateway::start_with(
        POLICY,
        &api.endpoint(),
        GatewayOptions {
            identity_spiffe_id: Some(GATEWAY_ID.to_string()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let current = named.gateway().identity().current().unwrap();
    assert_eq!(current.spiffe_id.to_string(), GATEWAY_ID);
    // Agents that insist on the gateway's ID get through the handshake.
    let agent = test_harness::agent::AgentClient::new(
        &ca.mint_svid(RESEARCH),
        &[ca.root_cert()],
        named.proxy_addr(),
    )
    .unwrap()
    .expect_gateway_id(GATEWAY_ID);
    agent
        .handshake()
        .await
        .expect("the gateway presents its own SVID");
    named.shutdown().await;

    // Without the key the Workload API's default, the first SVID, is taken.
    let unnamed = TestGateway::start(POLICY, &api.endpoint()).await.unwrap();
    let current = unnamed.gateway().identity().current().unwrap();
    assert_eq!(current.spiffe_id.to_string(), RESEARCH);
    unnamed.shutdown().await;
    api.shutdown().await;
}
