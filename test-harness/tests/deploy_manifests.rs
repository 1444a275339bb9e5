//! Validates the deployment files without a cluster or a Docker engine.
//!
//! - Every Kubernetes manifest under `deploy/kubernetes/` parses into the Kubernetes API
//!   types (k8s-openapi), and no field is lost on the way (a typo'd key would be ignored
//!   by the API types and silently dropped by `kubectl apply`).
//! - The invariants the deployment promises hold: Pod Security `restricted` labels and
//!   pod specs that pass it, the gateway's replicas, probes on the admin port, the
//!   Workload API socket through the SPIFFE CSI driver, default-deny NetworkPolicies,
//!   the PodDisruptionBudget, ClusterSPIFFEIDs that give the IDs the policy names.
//! - The real `kustomize build` renders both kustomizations, and the gateway mounts the
//!   ConfigMaps it generates by their final (hashed) names.
//! - `docker-compose.yml` parses, and every file it mounts exists in the repository.
//! - Every policy shipped with the deployment passes `policy check` (and its tests),
//!   and every shipped `gateway.yaml` loads.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use egress_gateway::config::{Env, GatewayConfig, Overrides};
use egress_policy::testing::{parse_tests, run_tests};
use egress_policy::Policy;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PodSpec, Probe, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

const GATEWAY_NS: &str = "egress-gateway";
const AGENTS_NS: &str = "ai-workloads";
const TRUST_DOMAIN: &str = "example.org";
const CSI_DRIVER: &str = "csi.spiffe.io";

/// The gateway config must load from the file alone, not from this machine's variables.
struct NoEnv;
impl Env for NoEnv {
    fn var(&self, _: &str) -> Option<String> {
        None
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("test-harness lives in the workspace")
        .to_path_buf()
}

fn k8s_dir() -> PathBuf {
    repo().join("deploy/kubernetes")
}

fn rel(path: &Path) -> String {
    path.strip_prefix(repo())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Every `.yaml`/`.yml` file under `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if matches!(p.extension().and_then(|x| x.to_str()), Some("yaml" | "yml")) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The documents of a (multi-document) YAML file, as JSON values.
fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
        .unwrap_or_else(|e| panic!("{}: not valid YAML: {e}", rel(path)));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn is_manifest(doc: &Value) -> bool {
    doc.get("apiVersion").is_some() && doc.get("kind").is_some()
}

// === Typed parsing ===

/// Parses into the API type, then checks that every field written survives a round
/// trip through it: k8s-openapi ignores unknown fields, as does the API server.
fn strict<T: DeserializeOwned + Serialize>(doc: &Value, origin: &str) -> T {
    let typed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{origin}: does not parse as its Kubernetes type: {e}"));
    let back = serde_json::to_value(&typed).unwrap();
    let mut lost = Vec::new();
    lost_fields(doc, &back, "", &mut lost);
    assert!(
        lost.is_empty(),
        "{origin}: fields unknown to the Kubernetes API type (typos?): {lost:?}"
    );
    typed
}

fn lost_fields(orig: &Value, back: &Value, path: &str, out: &mut Vec<String>) {
    match (orig, back) {
        (Value::Object(o), Value::Object(b)) => {
            for (k, v) in o {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    Some(bv) => lost_fields(v, bv, &p, out),
                    None if is_empty(v) => {}
                    None => out.push(p),
                }
            }
        }
        (Value::Array(o), Value::Array(b)) => {
            for (i, (ov, bv)) in o.iter().zip(b).enumerate() {
                lost_fields(ov, bv, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// Everything in `deploy/kubernetes`, typed.
#[derive(Default)]
struct Manifests {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    deployments: Vec<(String, Deployment)>,
    services: Vec<Service>,
    pdbs: Vec<PodDisruptionBudget>,
    network_policies: Vec<NetworkPolicy>,
    config_maps: Vec<ConfigMap>,
    secrets: Vec<Secret>,
    cluster_spiffe_ids: Vec<Value>,
    /// Files with manifests, relative to `deploy/kubernetes`.
    files: BTreeSet<String>,
}

fn load_manifests() -> Manifests {
    let mut m = Manifests::default();
    for path in yaml_files(&k8s_dir()) {
        let docs = yaml_docs(&path);
        let manifests: Vec<&Value> = docs.iter().filter(|d| is_manifest(d)).collect();
        if manifests.is_empty() || path.file_name().unwrap() == "kustomization.yaml" {
            continue;
        }
        assert_eq!(
            manifests.len(),
            docs.len(),
            "{}: a manifest file holds only manifests",
            rel(&path)
        );
        m.files
            .insert(path.strip_prefix(k8s_dir()).unwrap().display().to_string());
        for (i, doc) in manifests.into_iter().enumerate() {
            m.add(doc, &format!("{} (document {})", rel(&path), i + 1));
        }
    }
    m
}

impl Manifests {
    /// Parses one manifest into its API type and files it by kind.
    fn add(&mut self, doc: &Value, origin: &str) {
        let api = doc["apiVersion"].as_str().unwrap_or_default();
        let kind = doc["kind"].as_str().unwrap_or_default();
        match (api, kind) {
            ("v1", "Namespace") => self.namespaces.push(strict(doc, origin)),
            ("v1", "ServiceAccount") => self.service_accounts.push(strict(doc, origin)),
            ("apps/v1", "Deployment") => self
                .deployments
                .push((origin.to_string(), strict(doc, origin))),
            ("v1", "Service") => self.services.push(strict(doc, origin)),
            ("policy/v1", "PodDisruptionBudget") => self.pdbs.push(strict(doc, origin)),
            ("networking.k8s.io/v1", "NetworkPolicy") => {
                self.network_policies.push(strict(doc, origin))
            }
            ("v1", "ConfigMap") => self.config_maps.push(strict(doc, origin)),
            ("v1", "Secret") => self.secrets.push(strict(doc, origin)),
            ("spire.spiffe.io/v1alpha1", "ClusterSPIFFEID") => {
                check_cluster_spiffe_id(doc, origin);
                self.cluster_spiffe_ids.push(doc.clone());
            }
            _ => panic!("{origin}: {api} {kind} is not a kind this test knows; add it"),
        }
    }
}

/// ClusterSPIFFEID is a CRD: no k8s-openapi type, so check its shape against the
/// SPIRE Controller Manager's `ClusterSPIFFEIDSpec` by hand.
fn check_cluster_spiffe_id(doc: &Value, origin: &str) {
    let top: BTreeSet<&str> = doc
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    let allowed_top = BTreeSet::from(["apiVersion", "kind", "metadata", "spec"]);
    assert!(
        top.is_subset(&allowed_top),
        "{origin}: unknown top-level keys {top:?}"
    );
    assert!(
        doc["metadata"]["namespace"].is_null(),
        "{origin}: ClusterSPIFFEID is cluster-scoped"
    );
    assert!(doc["metadata"]["name"].is_string(), "{origin}: no name");
    let spec = doc["spec"].as_object().expect("spec");
    let known = [
        "spiffeIDTemplate",
        "ttl",
        "jwtTtl",
        "dnsNameTemplates",
        "workloadSelectorTemplates",
        "federatesWith",
        "namespaceSelector",
        "podSelector",
        "admin",
        "downstream",
        "autoPopulateDNSNames",
        "className",
        "fallback",
        "hint",
    ];
    for k in spec.keys() {
        assert!(
            known.contains(&k.as_str()),
            "{origin}: unknown spec field {k}"
        );
    }
    let template = spec["spiffeIDTemplate"].as_str().expect("spiffeIDTemplate");
    assert!(template.starts_with("spiffe://"), "{origin}: {template}");
    for key in ["namespaceSelector", "podSelector"] {
        if let Some(sel) = spec.get(key) {
            let _: LabelSelector = strict(sel, &format!("{origin}: spec.{key}"));
        }
    }
    for key in [
        "dnsNameTemplates",
        "workloadSelectorTemplates",
        "federatesWith",
    ] {
        if let Some(list) = spec.get(key) {
            assert!(
                list.as_array()
                    .is_some_and(|l| l.iter().all(Value::is_string)),
                "{origin}: spec.{key} is a list of strings"
            );
        }
    }
}

/// The ID the controller manager would render for a pod (the templates used here).
fn render_spiffe_id(template: &str, namespace: &str, service_account: &str) -> String {
    template
        .replace("{{ .TrustDomain }}", TRUST_DOMAIN)
        .replace("{{ .PodMeta.Namespace }}", namespace)
        .replace("{{ .PodSpec.ServiceAccountName }}", service_account)
}

// === Helpers over the API types ===

fn labels_match(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    assert!(
        selector
            .match_expressions
            .as_ref()
            .is_none_or(Vec::is_empty),
        "this test only evaluates matchLabels"
    );
    selector
        .match_labels
        .as_ref()
        .is_none_or(|want| want.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

fn selects_namespace(selector: &LabelSelector, namespace: &str) -> bool {
    let labels = BTreeMap::from([(
        "kubernetes.io/metadata.name".to_string(),
        namespace.to_string(),
    )]);
    selector
        .match_labels
        .as_ref()
        .is_some_and(|l| !l.is_empty())
        && labels_match(selector, &labels)
}

fn pod_labels(d: &Deployment) -> BTreeMap<String, String> {
    d.spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default()
}

fn pod_spec(d: &Deployment) -> &PodSpec {
    d.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
}

fn namespace_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or_default()
}

fn container_port(c: &Container, port: &IntOrString) -> i32 {
    match port {
        IntOrString::Int(p) => *p,
        IntOrString::String(name) => {
            c.ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .unwrap_or_else(|| panic!("container {} has no port named {name}", c.name))
                .container_port
        }
    }
}

/// (path, port) of an httpGet probe.
fn http_probe(c: &Container, probe: Option<&Probe>) -> (String, i32) {
    let get = probe
        .and_then(|p| p.http_get.as_ref())
        .unwrap_or_else(|| panic!("container {}: probe is not httpGet", c.name));
    (
        get.path.clone().unwrap_or_default(),
        container_port(c, &get.port),
    )
}

fn arg_value<'a>(c: &'a Container, flag: &str) -> Option<&'a str> {
    let args = c.args.as_deref().unwrap_or_default();
    let prefix = format!("{flag}=");
    args.iter().enumerate().find_map(|(i, a)| {
        if a == flag {
            args.get(i + 1).map(String::as_str)
        } else {
            a.strip_prefix(&prefix)
        }
    })
}

fn mount_path<'a>(c: &'a Container, volume: &str) -> &'a str {
    let m = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == volume)
        .unwrap_or_else(|| panic!("container {} does not mount {volume}", c.name));
    assert_eq!(
        m.read_only,
        Some(true),
        "container {}: {volume} must be mounted read-only",
        c.name
    );
    &m.mount_path
}

/// The pod's CSI volume from the SPIFFE CSI driver; returns its name.
fn spiffe_csi_volume(spec: &PodSpec, origin: &str) -> String {
    let v = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.csi.as_ref().is_some_and(|c| c.driver == CSI_DRIVER))
        .unwrap_or_else(|| panic!("{origin}: no {CSI_DRIVER} volume for the Workload API"));
    assert_eq!(
        v.csi.as_ref().unwrap().read_only,
        Some(true),
        "{origin}: the Workload API volume is read-only"
    );
    v.name.clone()
}

/// Pod Security Standards, `restricted` profile, as far as a pod spec can show it.
fn check_restricted(spec: &PodSpec, origin: &str) {
    let pod_sc = spec.security_context.clone().unwrap_or_default();
    assert_ne!(spec.host_network, Some(true), "{origin}: hostNetwork");
    assert_ne!(spec.host_pid, Some(true), "{origin}: hostPID");
    assert_ne!(spec.host_ipc, Some(true), "{origin}: hostIPC");
    for v in spec.volumes.iter().flatten() {
        let allowed = v.config_map.is_some()
            || v.csi.is_some()
            || v.downward_api.is_some()
            || v.empty_dir.is_some()
            || v.ephemeral.is_some()
            || v.persistent_volume_claim.is_some()
            || v.projected.is_some()
            || v.secret.is_some();
        assert!(
            allowed,
            "{origin}: volume {} has a type restricted forbids",
            v.name
        );
    }
    let containers = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten());
    for c in containers {
        let at = format!("{origin}: container {}", c.name);
        let sc = c.security_context.clone().unwrap_or_default();
        assert_eq!(
            sc.allow_privilege_escalation,
            Some(false),
            "{at}: allowPrivilegeEscalation"
        );
        assert_eq!(
            sc.read_only_root_filesystem,
            Some(true),
            "{at}: readOnlyRootFilesystem"
        );
        assert_ne!(sc.privileged, Some(true), "{at}: privileged");
        let caps = sc.capabilities.clone().unwrap_or_default();
        assert!(
            caps.drop.iter().flatten().any(|d| d == "ALL"),
            "{at}: capabilities.drop must hold ALL"
        );
        assert!(
            caps.add.iter().flatten().all(|a| a == "NET_BIND_SERVICE"),
            "{at}: capabilities.add"
        );
        let non_root = sc.run_as_non_root.or(pod_sc.run_as_non_root);
        assert_eq!(non_root, Some(true), "{at}: runAsNonRoot");
        let uid = sc.run_as_user.or(pod_sc.run_as_user);
        assert!(
            uid.is_some_and(|u| u != 0),
            "{at}: runAsUser must be a non-zero uid"
        );
        let seccomp = sc
            .seccomp_profile
            .as_ref()
            .or(pod_sc.seccomp_profile.as_ref())
            .map(|s| s.type_.as_str());
        assert_eq!(seccomp, Some("RuntimeDefault"), "{at}: seccompProfile");
        let res = c.resources.clone().unwrap_or_default();
        let requests = res.requests.unwrap_or_default();
        let limits = res.limits.unwrap_or_default();
        assert!(
            requests.contains_key("cpu") && requests.contains_key("memory"),
            "{at}: resources.requests cpu and memory"
        );
        assert!(
            limits.contains_key("memory"),
            "{at}: resources.limits.memory"
        );
    }
}

fn gateway_config() -> GatewayConfig {
    let path = k8s_dir().join("config/gateway.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    GatewayConfig::from_yaml_str(&text, &rel(&path), &Overrides::default(), &NoEnv)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn kustomizations() -> Vec<(PathBuf, Value)> {
    yaml_files(&k8s_dir())
        .into_iter()
        .filter(|p| p.file_name().unwrap() == "kustomization.yaml")
        .map(|p| {
            let doc = yaml_docs(&p).remove(0);
            (p, doc)
        })
        .collect()
}

/// `name` of a configMapGenerator entry: (file key -> source path, hash disabled).
fn config_map_generator(name: &str) -> (BTreeMap<String, String>, bool) {
    for (_, k) in kustomizations() {
        for g in k["configMapGenerator"].as_array().into_iter().flatten() {
            if g["name"] == name {
                let files = g["files"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| {
                        let f = f.as_str().unwrap();
                        let (key, src) = f.split_once('=').unwrap_or((f, f));
                        (key.to_string(), src.to_string())
                    })
                    .collect();
                let no_hash = g["options"]["disableNameSuffixHash"] == true;
                return (files, no_hash);
            }
        }
    }
    panic!("no configMapGenerator named {name}");
}

fn gateway_deployment(m: &Manifests) -> (&str, &Deployment) {
    let (origin, d) = m
        .deployments
        .iter()
        .find(|(_, d)| namespace_of(&d.metadata) == GATEWAY_NS)
        .expect("a Deployment in the egress-gateway namespace");
    (origin, d)
}

fn gateway_container(d: &Deployment) -> &Container {
    pod_spec(d)
        .containers
        .iter()
        .find(|c| c.name == "gateway")
        .expect("a container named gateway")
}

// === Kubernetes tests ===

#[test]
fn every_manifest_parses_into_the_kubernetes_api_types() {
    let m = load_manifests();
    assert_eq!(m.namespaces.len(), 2);
    assert!(!m.deployments.is_empty());
    assert!(!m.services.is_empty());
    assert!(!m.pdbs.is_empty());
    assert!(m.network_policies.len() >= 4);
    assert_eq!(m.cluster_spiffe_ids.len(), 2);
    assert_eq!(m.secrets.len(), 1, "the example Secret");
    assert!(
        m.config_maps.is_empty(),
        "ConfigMaps come from configMapGenerator"
    );
    let known_ns = BTreeSet::from([GATEWAY_NS, AGENTS_NS]);
    let namespaced = m
        .service_accounts
        .iter()
        .map(|o| &o.metadata)
        .chain(m.deployments.iter().map(|(_, o)| &o.metadata))
        .chain(m.services.iter().map(|o| &o.metadata))
        .chain(m.pdbs.iter().map(|o| &o.metadata))
        .chain(m.network_policies.iter().map(|o| &o.metadata))
        .chain(m.secrets.iter().map(|o| &o.metadata));
    for meta in namespaced {
        assert!(
            known_ns.contains(namespace_of(meta)),
            "{:?} must name its namespace, one of {known_ns:?}",
            meta.name
        );
    }
}

#[test]
fn kustomizations_list_every_manifest_and_every_file_they_name_exists() {
    let m = load_manifests();
    let mut listed = BTreeSet::new();
    for (path, k) in kustomizations() {
        let dir = path.parent().unwrap();
        assert_eq!(
            k["apiVersion"],
            "kustomize.config.k8s.io/v1beta1",
            "{}",
            rel(&path)
        );
        assert_eq!(k["kind"], "Kustomization", "{}", rel(&path));
        for r in k["resources"].as_array().unwrap() {
            let r = r.as_str().unwrap();
            let file = dir.join(r);
            assert!(
                file.is_file(),
                "{}: resource {r} does not exist",
                rel(&path)
            );
            listed.insert(file.strip_prefix(k8s_dir()).unwrap().display().to_string());
        }
        for g in k["configMapGenerator"].as_array().into_iter().flatten() {
            for f in g["files"].as_array().unwrap() {
                let f = f.as_str().unwrap();
                let src = f.split_once('=').map_or(f, |(_, s)| s);
                assert!(
                    dir.join(src).is_file(),
                    "{}: {src} does not exist",
                    rel(&path)
                );
            }
        }
    }
    for file in &m.files {
        // Examples (the Secret with a placeholder key) are applied by hand, on purpose.
        if file.ends_with(".example.yaml") {
            assert!(
                !listed.contains(file),
                "{file} must not be applied by kustomize"
            );
        } else {
            assert!(listed.contains(file), "{file} is in no kustomization.yaml");
        }
    }
}

#[test]
fn both_namespaces_enforce_the_restricted_pod_security_profile() {
    let m = load_manifests();
    for name in [GATEWAY_NS, AGENTS_NS] {
        let ns = m
            .namespaces
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("namespace {name}"));
        let labels = ns.metadata.labels.clone().unwrap_or_default();
        for mode in ["enforce", "audit", "warn"] {
            assert_eq!(
                labels
                    .get(&format!("pod-security.kubernetes.io/{mode}"))
                    .map(String::as_str),
                Some("restricted"),
                "namespace {name}: {mode}"
            );
        }
    }
    // Both namespaces enforce it, so every pod shipped must pass it.
    for (origin, d) in &m.deployments {
        check_restricted(pod_spec(d), origin);
    }
}

#[test]
fn the_gateway_deployment_is_highly_available_and_hardened() {
    let m = load_manifests();
    let (origin, d) = gateway_deployment(&m);
    let spec = d.spec.as_ref().unwrap();
    let replicas = spec.replicas.unwrap_or(1);
    assert!(replicas >= 2, "{origin}: replicas {replicas}");
    let labels = pod_labels(d);
    assert!(labels_match(&spec.selector, &labels), "{origin}: selector");
    let pod = pod_spec(d);
    assert_eq!(pod.automount_service_account_token, Some(false), "{origin}");
    assert_eq!(
        pod.service_account_name.as_deref(),
        Some("egress-gateway"),
        "{origin}: the service account names the SPIFFE ID"
    );
    assert!(
        m.service_accounts
            .iter()
            .any(|sa| sa.metadata.name.as_deref() == Some("egress-gateway")
                && namespace_of(&sa.metadata) == GATEWAY_NS),
        "the gateway's ServiceAccount"
    );

    // Anti-affinity on the node, selecting the gateway's own pods.
    let anti = pod
        .affinity
        .as_ref()
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .expect("podAntiAffinity");
    let terms = anti
        .preferred_during_scheduling_ignored_during_execution
        .iter()
        .flatten()
        .map(|w| &w.pod_affinity_term)
        .chain(
            anti.required_during_scheduling_ignored_during_execution
                .iter()
                .flatten(),
        );
    assert!(
        terms
            .into_iter()
            .any(|t| t.topology_key == "kubernetes.io/hostname"
                && t.label_selector
                    .as_ref()
                    .is_some_and(|s| labels_match(s, &labels))),
        "{origin}: anti-affinity per node on the gateway's own labels"
    );

    // The grace period covers the gateway's own drain.
    let cfg = gateway_config();
    let grace = pod.termination_grace_period_seconds.unwrap_or(30);
    assert!(
        u64::try_from(grace).unwrap() > cfg.shutdown_grace.as_secs(),
        "{origin}: terminationGracePeriodSeconds {grace} <= shutdown_grace"
    );
}

#[test]
fn gateway_probes_use_the_admin_port_and_the_config_binds_it_on_the_pod_ip() {
    let m = load_manifests();
    let (origin, d) = gateway_deployment(&m);
    let c = gateway_container(d);
    let cfg = gateway_config();
    assert!(
        cfg.admin.ip().is_unspecified(),
        "admin must bind 0.0.0.0 in the pod for the kubelet's probes, not {}",
        cfg.admin
    );
    let admin = i32::from(cfg.admin.port());
    assert_eq!(
        http_probe(c, c.liveness_probe.as_ref()),
        ("/healthz".to_string(), admin),
        "{origin}: liveness"
    );
    assert_eq!(
        http_probe(c, c.readiness_probe.as_ref()),
        ("/readyz".to_string(), admin),
        "{origin}: readiness"
    );
    assert_eq!(
        container_port(c, &IntOrString::String("proxy".into())),
        i32::from(cfg.listen.port()),
        "{origin}: the proxy port is the config's listen port"
    );
    assert_ne!(cfg.listen.port(), cfg.admin.port());
}

#[test]
fn gateway_mounts_the_workload_api_through_the_csi_driver_and_its_config() {
    let m = load_manifests();
    let (origin, d) = gateway_deployment(&m);
    let pod = pod_spec(d);
    let c = gateway_container(d);
    let cfg = gateway_config();

    let csi = spiffe_csi_volume(pod, origin);
    let socket_dir = mount_path(c, &csi);
    assert!(
        cfg.workload_api
            .starts_with(&format!("unix://{}/", socket_dir.trim_end_matches('/'))),
        "{origin}: workload_api {} is not in the CSI mount {socket_dir}",
        cfg.workload_api
    );

    // gateway.yaml comes from the egress-gateway-config generator, policy.yaml from
    // egress-gateway-policy; the paths in args and config agree with the mounts.
    let volume_for = |cm: &str| {
        pod.volumes
            .iter()
            .flatten()
            .find(|v| v.config_map.as_ref().is_some_and(|c| c.name == cm))
            .unwrap_or_else(|| panic!("{origin}: no volume for ConfigMap {cm}"))
            .name
            .clone()
    };
    let (files, _) = config_map_generator("egress-gateway-config");
    assert!(files.contains_key("gateway.yaml"));
    let config_dir = mount_path(c, &volume_for("egress-gateway-config"));
    assert_eq!(
        arg_value(c, "--config"),
        Some(format!("{config_dir}/gateway.yaml").as_str()),
        "{origin}: --config"
    );
    assert_eq!(
        c.args
            .as_deref()
            .unwrap_or_default()
            .first()
            .map(String::as_str),
        Some("run")
    );

    let (files, no_hash) = config_map_generator("egress-gateway-policy");
    assert!(files.contains_key("policy.yaml"));
    assert!(
        no_hash,
        "the policy ConfigMap keeps its name, so updates reach the mounted file live"
    );
    let policy_dir = mount_path(c, &volume_for("egress-gateway-policy"));
    assert_eq!(cfg.policy, Path::new(policy_dir).join("policy.yaml"));

    // Every injected credential file is on a mounted Secret.
    let policy: Value = yaml_docs(&k8s_dir().join("config/policy.yaml")).remove(0);
    let mut secret_files = Vec::new();
    for agent in policy["agents"].as_array().unwrap() {
        for p in agent["pathways"].as_array().unwrap() {
            for h in p["upstream"]["inject_headers"]
                .as_object()
                .into_iter()
                .flatten()
            {
                secret_files.push(h.1["secret_file"].as_str().unwrap().to_string());
            }
        }
    }
    assert!(!secret_files.is_empty(), "the example injects a credential");
    for f in secret_files {
        let mounted = c.volume_mounts.iter().flatten().any(|vm| {
            f.starts_with(&format!("{}/", vm.mount_path))
                && pod.volumes.iter().flatten().any(|v| {
                    v.name == vm.name
                        && v.secret.as_ref().is_some_and(|s| {
                            m.secrets
                                .iter()
                                .any(|sec| sec.metadata.name == s.secret_name)
                        })
                })
        });
        assert!(mounted, "{origin}: {f} is not on a mounted Secret");
    }
}

#[test]
fn service_and_disruption_budget_select_the_gateway() {
    let m = load_manifests();
    let (_, d) = gateway_deployment(&m);
    let labels = pod_labels(d);
    let replicas = d.spec.as_ref().unwrap().replicas.unwrap_or(1);
    let c = gateway_container(d);

    let svc = m
        .services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some("egress-gateway"))
        .expect("Service egress-gateway");
    assert_eq!(namespace_of(&svc.metadata), GATEWAY_NS);
    let spec = svc.spec.as_ref().unwrap();
    let selector = spec.selector.clone().unwrap_or_default();
    assert!(!selector.is_empty());
    assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let proxy = spec
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("proxy"))
        .expect("a proxy port");
    assert_eq!(proxy.port, 8443);
    assert_eq!(
        container_port(c, proxy.target_port.as_ref().unwrap()),
        8443,
        "the Service reaches the mTLS listener"
    );

    let pdb = m
        .pdbs
        .iter()
        .find(|p| namespace_of(&p.metadata) == GATEWAY_NS)
        .expect("a PodDisruptionBudget for the gateway");
    let spec = pdb.spec.as_ref().unwrap();
    assert!(labels_match(spec.selector.as_ref().unwrap(), &labels));
    match (&spec.min_available, &spec.max_unavailable) {
        (Some(IntOrString::Int(n)), None) => assert!(*n >= 1 && *n < replicas),
        (None, Some(IntOrString::Int(n))) => assert!(*n >= 1 && *n < replicas),
        other => panic!(
            "PodDisruptionBudget: want an integer minAvailable or maxUnavailable, got {other:?}"
        ),
    }
}

fn policies_in(m: &Manifests, ns: &str) -> Vec<NetworkPolicy> {
    m.network_policies
        .iter()
        .filter(|p| namespace_of(&p.metadata) == ns)
        .cloned()
        .collect()
}

fn has_default_deny(policies: &[NetworkPolicy]) -> bool {
    policies.iter().any(|p| {
        let spec = p.spec.as_ref().unwrap();
        let types = spec.policy_types.clone().unwrap_or_default();
        spec.pod_selector.as_ref().is_none_or(|s| {
            s.match_labels.as_ref().is_none_or(BTreeMap::is_empty)
                && s.match_expressions.as_ref().is_none_or(Vec::is_empty)
        }) && types.iter().any(|t| t == "Ingress")
            && types.iter().any(|t| t == "Egress")
            && spec.ingress.as_ref().is_none_or(Vec::is_empty)
            && spec.egress.as_ref().is_none_or(Vec::is_empty)
    })
}

/// The TCP/UDP port numbers of a rule; a rule without ports allows every port.
fn rule_ports(ports: Option<&Vec<NetworkPolicyPort>>) -> Option<BTreeSet<(String, i32)>> {
    let ports = ports?;
    if ports.is_empty() {
        return None;
    }
    Some(
        ports
            .iter()
            .map(|p| {
                let n = match p.port.as_ref().expect("a port number") {
                    IntOrString::Int(n) => *n,
                    IntOrString::String(s) => panic!("named port {s}: use numbers here"),
                };
                assert!(p.end_port.is_none(), "no port ranges");
                (p.protocol.clone().unwrap_or_else(|| "TCP".into()), n)
            })
            .collect(),
    )
}

fn is_dns(peer: &NetworkPolicyPeer) -> bool {
    peer.namespace_selector
        .as_ref()
        .is_some_and(|s| selects_namespace(s, "kube-system"))
        && peer.pod_selector.as_ref().is_some_and(|s| {
            s.match_labels
                .as_ref()
                .is_some_and(|l| l.get("k8s-app").map(String::as_str) == Some("kube-dns"))
        })
}

fn dns_ports() -> BTreeSet<(String, i32)> {
    BTreeSet::from([("UDP".to_string(), 53), ("TCP".to_string(), 53)])
}

#[test]
fn agents_can_only_reach_the_gateway_and_dns() {
    let m = load_manifests();
    let (_, d) = gateway_deployment(&m);
    let gateway_labels = pod_labels(d);
    let policies = policies_in(&m, AGENTS_NS);
    assert!(
        has_default_deny(&policies),
        "ai-workloads: a default-deny policy"
    );
    let mut reaches_gateway = false;
    for p in &policies {
        let name = p.metadata.name.clone().unwrap_or_default();
        let spec = p.spec.as_ref().unwrap();
        assert!(
            spec.ingress.as_ref().is_none_or(Vec::is_empty),
            "ai-workloads/{name}: agents accept no connections"
        );
        for rule in spec.egress.iter().flatten() {
            let peers = rule.to.as_ref().filter(|t| !t.is_empty());
            let peers = peers.unwrap_or_else(|| panic!("ai-workloads/{name}: egress to anywhere"));
            let ports = rule_ports(rule.ports.as_ref())
                .unwrap_or_else(|| panic!("ai-workloads/{name}: egress on every port"));
            for peer in peers {
                assert!(peer.ip_block.is_none(), "ai-workloads/{name}: no ipBlock");
                if is_dns(peer) {
                    assert!(
                        ports.is_subset(&dns_ports()),
                        "ai-workloads/{name}: DNS ports"
                    );
                    continue;
                }
                let to_gateway_ns = peer
                    .namespace_selector
                    .as_ref()
                    .is_some_and(|s| selects_namespace(s, GATEWAY_NS));
                let to_gateway_pods = peer.pod_selector.as_ref().is_some_and(|s| {
                    s.match_labels.as_ref().is_some_and(|l| !l.is_empty())
                        && labels_match(s, &gateway_labels)
                });
                assert!(
                    to_gateway_ns && to_gateway_pods,
                    "ai-workloads/{name}: egress to something other than the gateway: {peer:?}"
                );
                assert_eq!(
                    ports,
                    BTreeSet::from([("TCP".to_string(), 8443)]),
                    "ai-workloads/{name}: only the gateway's mTLS port"
                );
                reaches_gateway = true;
            }
        }
    }
    assert!(
        reaches_gateway,
        "agents must be allowed to reach the gateway"
    );
}

#[test]
fn the_gateway_is_reached_only_from_agents_and_reaches_only_the_internet() {
    let m = load_manifests();
    let policies = policies_in(&m, GATEWAY_NS);
    assert!(
        has_default_deny(&policies),
        "egress-gateway: a default-deny policy"
    );
    let mut from_agents = false;
    let mut internet = false;
    for p in &policies {
        let name = p.metadata.name.clone().unwrap_or_default();
        let spec = p.spec.as_ref().unwrap();
        for rule in spec.ingress.iter().flatten() {
            let peers = rule.from.as_ref().filter(|f| !f.is_empty());
            let peers =
                peers.unwrap_or_else(|| panic!("egress-gateway/{name}: ingress from anywhere"));
            let ports = rule_ports(rule.ports.as_ref())
                .unwrap_or_else(|| panic!("egress-gateway/{name}: ingress on every port"));
            for peer in peers {
                assert!(
                    peer.ip_block.is_none(),
                    "egress-gateway/{name}: no ipBlock ingress"
                );
                let ns = peer
                    .namespace_selector
                    .as_ref()
                    .expect("a namespaceSelector");
                if selects_namespace(ns, AGENTS_NS) {
                    assert_eq!(ports, BTreeSet::from([("TCP".to_string(), 8443)]));
                    from_agents = true;
                } else {
                    // Anything else (Prometheus) gets the admin port only, never 8443.
                    assert_eq!(
                        ports,
                        BTreeSet::from([("TCP".to_string(), 9901)]),
                        "egress-gateway/{name}: only ai-workloads reaches the proxy port"
                    );
                }
            }
        }
        for rule in spec.egress.iter().flatten() {
            let peers = rule.to.as_ref().filter(|t| !t.is_empty());
            let peers =
                peers.unwrap_or_else(|| panic!("egress-gateway/{name}: egress to anywhere"));
            for peer in peers {
                if let Some(block) = &peer.ip_block {
                    let except: BTreeSet<&str> =
                        block.except.iter().flatten().map(String::as_str).collect();
                    let required: &[&str] = if block.cidr == "0.0.0.0/0" {
                        &[
                            "10.0.0.0/8",
                            "172.16.0.0/12",
                            "192.168.0.0/16",
                            "169.254.0.0/16",
                            "100.64.0.0/10",
                            "127.0.0.0/8",
                        ]
                    } else if block.cidr == "::/0" {
                        &["fc00::/7", "fe80::/10", "::1/128"]
                    } else {
                        panic!("egress-gateway/{name}: unexpected ipBlock {}", block.cidr)
                    };
                    for r in required {
                        assert!(
                            except.contains(r),
                            "egress-gateway/{name}: {} must except {r}",
                            block.cidr
                        );
                    }
                    internet |= block.cidr == "0.0.0.0/0";
                } else {
                    // In-cluster peers need an explicit namespace and explicit ports.
                    assert!(
                        peer.namespace_selector.as_ref().is_some_and(|s| {
                            s.match_labels.as_ref().is_some_and(|l| !l.is_empty())
                        }),
                        "egress-gateway/{name}: in-cluster egress names its namespace"
                    );
                    let ports = rule_ports(rule.ports.as_ref()).unwrap_or_else(|| {
                        panic!("egress-gateway/{name}: in-cluster egress on every port")
                    });
                    if is_dns(peer) {
                        assert!(ports.is_subset(&dns_ports()));
                    }
                }
            }
        }
    }
    assert!(from_agents, "the gateway must accept the agents");
    assert!(internet, "the gateway must reach the internet");
}

#[test]
fn cluster_spiffe_ids_give_the_ids_the_policy_and_the_sidecar_use() {
    let m = load_manifests();
    let (_, d) = gateway_deployment(&m);
    let gateway_labels = pod_labels(d);
    let by_ns = |ns: &str| -> &Value {
        m.cluster_spiffe_ids
            .iter()
            .find(|c| {
                let sel: LabelSelector =
                    serde_json::from_value(c["spec"]["namespaceSelector"].clone()).unwrap();
                selects_namespace(&sel, ns)
            })
            .unwrap_or_else(|| panic!("a ClusterSPIFFEID for namespace {ns}"))
    };

    let gw = by_ns(GATEWAY_NS);
    let sel: LabelSelector = serde_json::from_value(gw["spec"]["podSelector"].clone()).unwrap();
    assert!(labels_match(&sel, &gateway_labels));
    let gateway_id = render_spiffe_id(
        gw["spec"]["spiffeIDTemplate"].as_str().unwrap(),
        GATEWAY_NS,
        pod_spec(d).service_account_name.as_deref().unwrap(),
    );
    assert_eq!(gateway_id, test_harness::gateway::GATEWAY_ID);
    // The Service name, so curl can verify the proxy by DNS name.
    let dns: Vec<&str> = gw["spec"]["dnsNameTemplates"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(dns.contains(&"egress-gateway.egress-gateway.svc"));

    let agents = by_ns(AGENTS_NS);
    let template = agents["spec"]["spiffeIDTemplate"].as_str().unwrap();
    let policy_yaml: Value = yaml_docs(&k8s_dir().join("config/policy.yaml")).remove(0);
    let policy_ids: BTreeSet<&str> = policy_yaml["agents"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["id"].as_str())
        .collect();
    assert!(!policy_ids.is_empty());

    // Every agent Deployment's ID is one the policy names, and its sidecar accepts
    // exactly the gateway's ID at the Service's address.
    let svc = m
        .services
        .iter()
        .find(|s| namespace_of(&s.metadata) == GATEWAY_NS)
        .unwrap();
    let gateway_addr = format!(
        "{}.{}.svc:8443",
        svc.metadata.name.as_deref().unwrap(),
        GATEWAY_NS
    );
    let mut agent_deployments = 0;
    for (origin, d) in m
        .deployments
        .iter()
        .filter(|(_, d)| namespace_of(&d.metadata) == AGENTS_NS)
    {
        agent_deployments += 1;
        let pod = pod_spec(d);
        let sa = pod
            .service_account_name
            .as_deref()
            .expect("a service account per agent");
        assert!(
            m.service_accounts
                .iter()
                .any(|s| s.metadata.name.as_deref() == Some(sa)
                    && namespace_of(&s.metadata) == AGENTS_NS),
            "{origin}: ServiceAccount {sa}"
        );
        let id = render_spiffe_id(template, AGENTS_NS, sa);
        assert!(
            policy_ids.contains(id.as_str()),
            "{origin}: {id} is not in the policy"
        );
        check_sidecar(origin, pod, &gateway_id, &gateway_addr);
    }
    assert!(agent_deployments >= 1, "an example agent Deployment");
}

fn check_sidecar(origin: &str, pod: &PodSpec, gateway_id: &str, gateway_addr: &str) {
    let sidecar = pod
        .init_containers
        .iter()
        .flatten()
        .find(|c| {
            c.args
                .as_deref()
                .unwrap_or_default()
                .first()
                .map(String::as_str)
                == Some("sidecar")
        })
        .unwrap_or_else(|| panic!("{origin}: no egress-gateway sidecar"));
    assert_eq!(
        sidecar.restart_policy.as_deref(),
        Some("Always"),
        "{origin}: a native sidecar (restartPolicy: Always)"
    );
    assert_eq!(
        arg_value(sidecar, "--gateway-id"),
        Some(gateway_id),
        "{origin}"
    );
    assert_eq!(
        arg_value(sidecar, "--gateway"),
        Some(gateway_addr),
        "{origin}"
    );
    let listen = arg_value(sidecar, "--listen").unwrap_or("127.0.0.1:15001");
    let listen: std::net::SocketAddr = listen.parse().unwrap();
    assert!(
        listen.ip().is_loopback(),
        "{origin}: the proxy port stays on loopback"
    );
    let admin: std::net::SocketAddr = arg_value(sidecar, "--admin").unwrap().parse().unwrap();
    let (path, port) = http_probe(sidecar, sidecar.readiness_probe.as_ref());
    assert_eq!((path.as_str(), port), ("/readyz", i32::from(admin.port())));
    let (path, port) = http_probe(sidecar, sidecar.liveness_probe.as_ref());
    assert_eq!((path.as_str(), port), ("/healthz", i32::from(admin.port())));

    let csi = spiffe_csi_volume(pod, origin);
    let dir = mount_path(sidecar, &csi);
    let api = arg_value(sidecar, "--workload-api").unwrap();
    assert!(
        api.starts_with(&format!("unix://{dir}/")),
        "{origin}: {api} not under {dir}"
    );

    let proxy = format!("http://{listen}");
    for c in &pod.containers {
        let env: BTreeMap<&str, &str> = c
            .env
            .iter()
            .flatten()
            .filter_map(|e| Some((e.name.as_str(), e.value.as_deref()?)))
            .collect();
        for var in ["HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"] {
            assert_eq!(
                env.get(var).copied(),
                Some(proxy.as_str()),
                "{origin}: {} {var}",
                c.name
            );
        }
        assert!(
            c.volume_mounts.iter().flatten().all(|m| m.name != csi),
            "{origin}: only the sidecar holds the agent's SVID"
        );
    }
}

// === Policies and gateway configs shipped with the deployment ===

/// Folders whose policies and gateway configs ship with the deployment.
fn shipped_dirs() -> Vec<PathBuf> {
    ["deploy", "spire-config/compose"]
        .iter()
        .map(|d| repo().join(d))
        .filter(|d| d.is_dir())
        .collect()
}

#[test]
fn every_shipped_policy_passes_policy_check_and_its_tests() {
    let mut checked = 0;
    for path in shipped_dirs().iter().flat_map(|d| yaml_files(d)) {
        let docs = yaml_docs(&path);
        let Some(doc) = docs.first() else { continue };
        if docs.len() != 1 || doc.get("trust_domains").is_none() || is_manifest(doc) {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let policy = Policy::from_yaml_str(&text, &rel(&path))
            .unwrap_or_else(|e| panic!("policy check {}: {e}", rel(&path)));
        checked += 1;
        let tests = path.with_extension("tests.yaml");
        if tests.is_file() {
            let text = std::fs::read_to_string(&tests).unwrap();
            let cases = parse_tests(&text, &rel(&tests)).unwrap_or_else(|e| panic!("{e}"));
            let report = run_tests(&policy, &cases);
            let failures: Vec<_> = report.failures().collect();
            assert!(failures.is_empty(), "{}: {failures:#?}", rel(&tests));
            assert!(report.passed() > 0);
        }
    }
    // deploy/kubernetes/config and deploy/compose/gateway.
    assert!(checked >= 2, "found {checked} policies to check");
}

#[test]
fn every_shipped_gateway_config_loads() {
    let mut loaded = 0;
    for path in shipped_dirs().iter().flat_map(|d| yaml_files(d)) {
        if path.file_name().unwrap() != "gateway.yaml" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        GatewayConfig::from_yaml_str(&text, &rel(&path), &Overrides::default(), &NoEnv)
            .unwrap_or_else(|e| panic!("{e}"));
        loaded += 1;
    }
    assert!(loaded >= 2, "found {loaded} gateway configs");
}

#[test]
fn the_dockerfile_builds_the_binary_into_a_non_root_image() {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let froms: Vec<&str> = text
        .lines()
        .filter(|l| l.trim_start().starts_with("FROM "))
        .collect();
    assert!(froms.len() >= 2, "multi-stage: {froms:?}");
    let runtime = froms.last().unwrap();
    assert!(runtime.contains("distroless"), "runtime base: {runtime}");
    let user = text
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("USER "))
        .expect("a USER line");
    let uid: u32 = user
        .split(':')
        .next()
        .unwrap()
        .parse()
        .expect("a numeric uid");
    assert_ne!(uid, 0);
    assert!(text.contains("-p egress-gateway"));
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    for line in ["target", ".git"] {
        assert!(
            ignore.lines().any(|l| l.trim() == line),
            ".dockerignore: {line}"
        );
    }
}

// === Rendered by the real kustomize ===

/// The kustomize binary `scripts/install-kustomize.sh` built, or `None` after a loud
/// message (a failure under `scripts/test.sh` or in CI).
fn kustomize() -> Option<PathBuf> {
    let candidates = std::env::var_os("EGRESS_KUSTOMIZE")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/egress-gateway/bin/kustomize")),
        )
        .chain(std::env::var_os("PATH").into_iter().flat_map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("kustomize"))
                .collect::<Vec<_>>()
        }));
    for c in candidates {
        if c.is_file() {
            return Some(c);
        }
    }
    assert!(
        !test_harness::deps_required(),
        "kustomize is required here (scripts/install-kustomize.sh builds it)"
    );
    eprintln!("SKIPPED: kustomize not installed (scripts/install-kustomize.sh)");
    None
}

/// `kustomize build DIR`, parsed into documents.
fn kustomize_build(bin: &Path, dir: &Path) -> Vec<Value> {
    let out = std::process::Command::new(bin)
        .arg("build")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kustomize build {} failed:\n{}",
        rel(dir),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

#[test]
fn kustomize_renders_the_deployment_with_its_generated_config_maps_wired_in() {
    let Some(bin) = kustomize() else { return };
    let docs = kustomize_build(&bin, &k8s_dir());
    let mut rendered = Manifests::default();
    for (i, doc) in docs.iter().enumerate() {
        rendered.add(
            doc,
            &format!("kustomize build deploy/kubernetes (document {})", i + 1),
        );
    }
    // Everything the files hold (but the example agent and the example Secret, which
    // are applied on their own), plus the two generated ConfigMaps.
    let files = load_manifests();
    let gateway_only = |m: &Manifests| {
        m.deployments
            .iter()
            .filter(|(_, d)| namespace_of(&d.metadata) == GATEWAY_NS)
            .count()
    };
    assert_eq!(rendered.deployments.len(), 1);
    assert_eq!(gateway_only(&rendered), gateway_only(&files));
    assert!(rendered.secrets.is_empty());
    assert_eq!(
        rendered.network_policies.len(),
        files.network_policies.len()
    );
    assert_eq!(
        rendered.cluster_spiffe_ids.len(),
        files.cluster_spiffe_ids.len()
    );
    assert_eq!(
        rendered.config_maps.len(),
        2,
        "gateway.yaml and policy.yaml"
    );

    // The ConfigMaps carry the shipped files, byte for byte.
    let cm = |prefix: &str| {
        rendered
            .config_maps
            .iter()
            .find(|c| c.metadata.name.as_deref().unwrap_or("").starts_with(prefix))
            .unwrap_or_else(|| panic!("no generated ConfigMap {prefix}*"))
    };
    for (name, key, file) in [
        (
            "egress-gateway-config",
            "gateway.yaml",
            "config/gateway.yaml",
        ),
        ("egress-gateway-policy", "policy.yaml", "config/policy.yaml"),
    ] {
        let c = cm(name);
        assert_eq!(namespace_of(&c.metadata), GATEWAY_NS);
        let data = c.data.as_ref().and_then(|d| d.get(key)).unwrap();
        assert_eq!(
            data,
            &std::fs::read_to_string(k8s_dir().join(file)).unwrap(),
            "{name}: {key}"
        );
    }
    // gateway.yaml's name carries a content hash (a change rolls the pods); the
    // policy's does not (the kubelet updates it in place and the gateway reloads it).
    assert_ne!(
        cm("egress-gateway-config").metadata.name.as_deref(),
        Some("egress-gateway-config")
    );
    assert_eq!(
        cm("egress-gateway-policy").metadata.name.as_deref(),
        Some("egress-gateway-policy")
    );

    // Every ConfigMap the gateway mounts is one kustomize rendered, by its final name.
    let (_, d) = gateway_deployment(&rendered);
    let names: BTreeSet<&str> = rendered
        .config_maps
        .iter()
        .filter_map(|c| c.metadata.name.as_deref())
        .collect();
    let mounted: Vec<&str> = pod_spec(d)
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.config_map.as_ref().map(|c| c.name.as_str()))
        .collect();
    assert_eq!(mounted.len(), 2, "{mounted:?}");
    for m in mounted {
        assert!(
            names.contains(m),
            "the gateway mounts ConfigMap {m}, which kustomize did not render ({names:?})"
        );
    }
    assert_eq!(
        gateway_container(d).image.as_deref(),
        Some("egress-gateway:0.1.0")
    );

    // The example agent renders on its own, in the agents' namespace.
    let docs = kustomize_build(&bin, &k8s_dir().join("example-agent"));
    let mut agent = Manifests::default();
    for (i, doc) in docs.iter().enumerate() {
        agent.add(
            doc,
            &format!(
                "kustomize build deploy/kubernetes/example-agent (document {})",
                i + 1
            ),
        );
    }
    assert_eq!(agent.deployments.len(), 1);
    assert!(agent
        .deployments
        .iter()
        .all(|(_, d)| namespace_of(&d.metadata) == AGENTS_NS));
}

// === docker-compose.yml ===

fn compose() -> Value {
    let path = repo().join("docker-compose.yml");
    let docs = yaml_docs(&path);
    assert_eq!(docs.len(), 1, "docker-compose.yml is one document");
    docs.into_iter().next().unwrap()
}

fn services(c: &Value) -> &serde_json::Map<String, Value> {
    c["services"].as_object().expect("services")
}

fn networks_of(svc: &Value) -> BTreeSet<String> {
    match &svc["networks"] {
        Value::Array(a) => a
            .iter()
            .filter_map(|n| n.as_str().map(String::from))
            .collect(),
        Value::Object(m) => m.keys().cloned().collect(),
        _ => BTreeSet::new(),
    }
}

/// (source, target) of every volume entry, short or long syntax.
fn volume_mounts(svc: &Value) -> Vec<(String, String)> {
    svc["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| match v {
            Value::String(s) => {
                let mut parts = s.splitn(3, ':');
                let src = parts.next().unwrap_or_default().to_string();
                let dst = parts.next().unwrap_or_default().to_string();
                (src, dst)
            }
            other => (
                other["source"].as_str().unwrap_or_default().to_string(),
                other["target"].as_str().unwrap_or_default().to_string(),
            ),
        })
        .collect()
}

#[test]
fn compose_parses_and_every_file_it_mounts_exists() {
    let c = compose();
    let declared_volumes: BTreeSet<&str> = c["volumes"]
        .as_object()
        .map(|m| m.keys().map(String::as_str).collect())
        .unwrap_or_default();
    let mut mounted_files = 0;
    for (name, svc) in services(&c) {
        assert!(
            svc["image"].is_string() || svc["build"].is_object() || svc["build"].is_string(),
            "service {name}: an image or a build"
        );
        for (src, dst) in volume_mounts(svc) {
            assert!(dst.starts_with('/'), "service {name}: mount target {dst}");
            if let Some(rel_src) = src.strip_prefix("./") {
                let p = repo().join(rel_src);
                assert!(
                    p.exists(),
                    "service {name}: {src} does not exist in the repository"
                );
                mounted_files += 1;
            } else if !src.starts_with('/') {
                assert!(
                    declared_volumes.contains(src.as_str()),
                    "service {name}: volume {src} is not declared"
                );
            }
        }
        if let Some(ctx) = svc["build"].as_str() {
            assert!(
                repo().join(ctx).join("Dockerfile").is_file(),
                "service {name}: build {ctx}"
            );
        }
        for dep in match &svc["depends_on"] {
            Value::Array(a) => a
                .iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect(),
            Value::Object(m) => m.keys().cloned().collect::<Vec<_>>(),
            _ => Vec::new(),
        } {
            assert!(
                services(&c).contains_key(&dep),
                "service {name}: depends on unknown {dep}"
            );
        }
    }
    assert!(
        mounted_files >= 8,
        "expected the demo's config files to be mounted"
    );
}

#[test]
fn compose_uses_the_pinned_spire_images() {
    let c = compose();
    let version = std::fs::read_to_string(repo().join("spire-config/VERSION")).unwrap();
    let version = version.trim();
    for (svc, image) in [
        ("spire-server", "spire-server"),
        ("spire-agent", "spire-agent"),
    ] {
        assert_eq!(
            services(&c)[svc]["image"].as_str(),
            Some(format!("ghcr.io/spiffe/{image}:{version}").as_str()),
            "{svc} follows spire-config/VERSION"
        );
    }
    let agent_conf =
        std::fs::read_to_string(repo().join("spire-config/compose/agent.conf")).unwrap();
    assert!(agent_conf.contains("WorkloadAttestor \"docker\""));
    assert_eq!(
        services(&c)["spire-agent"]["pid"],
        "host",
        "the docker attestor needs host PIDs"
    );
    let agent_mounts = volume_mounts(&services(&c)["spire-agent"]);
    assert!(agent_mounts
        .iter()
        .any(|(s, _)| s == "/var/run/docker.sock"));
}

#[test]
fn compose_agents_reach_nothing_but_the_gateway() {
    let c = compose();
    let nets = c["networks"].as_object().expect("networks");
    let internal: BTreeSet<&str> = nets
        .iter()
        .filter(|(_, n)| n["internal"] == true)
        .map(|(k, _)| k.as_str())
        .collect();
    assert_eq!(
        internal,
        BTreeSet::from(["agents"]),
        "one internal network, for the agents"
    );
    let all = services(&c);
    let gateway = networks_of(&all["gateway"]);
    assert!(
        gateway.contains("agents") && gateway.len() >= 2,
        "gateway: agents + egress"
    );

    let mut agent_services = 0;
    for (name, svc) in all {
        if name == "gateway" {
            continue;
        }
        // Every service that can reach the agents' network is on it alone.
        let nets = networks_of(svc);
        if nets.contains("agents") {
            assert_eq!(nets.len(), 1, "service {name} bridges the agents' network");
            assert!(svc["ports"].is_null(), "service {name}: no published ports");
            agent_services += 1;
        }
        if let Some(target) = svc["network_mode"]
            .as_str()
            .and_then(|m| m.strip_prefix("service:"))
        {
            let target_nets = networks_of(&all[target]);
            assert_eq!(
                target_nets,
                BTreeSet::from(["agents".to_string()]),
                "service {name} shares {target}'s namespace, which must be on `agents` only"
            );
        }
    }
    assert!(agent_services >= 2);
}

#[test]
fn compose_registers_every_labelled_workload_with_the_ids_the_policy_uses() {
    let c = compose();
    let entries = std::fs::read_to_string(repo().join("spire-config/compose/entries.sh")).unwrap();
    let policy: Value = yaml_docs(&repo().join("deploy/compose/gateway/policy.yaml")).remove(0);
    let policy_ids: BTreeSet<String> = policy["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap().replace("example.org", "$TD"))
        .collect();
    let mut labelled = BTreeSet::new();
    for (name, svc) in services(&c) {
        let Some(workload) = svc["labels"]["org.egress-gateway.workload"].as_str() else {
            continue;
        };
        labelled.insert(workload.to_string());
        // entries.sh: create "spiffe://$TD/..." <workload> [flags]
        let line = entries
            .lines()
            .find(|l| l.starts_with("create ") && l.split_whitespace().nth(2) == Some(workload))
            .unwrap_or_else(|| panic!("service {name}: no entry for label {workload}"));
        let id = line.split_whitespace().nth(1).unwrap().trim_matches('"');
        if workload == "egress-gateway" {
            assert_eq!(
                id.replace("$TD", "example.org"),
                test_harness::gateway::GATEWAY_ID
            );
            assert!(
                line.contains("-dns gateway"),
                "agents verify the proxy name `gateway`"
            );
        } else {
            assert!(
                policy_ids.contains(id),
                "{id} (service {name}) is not in the policy"
            );
        }
    }
    assert_eq!(labelled.len(), 3, "gateway + two agents: {labelled:?}");
    let sidecar = &services(&c)["coding-agent-sidecar"];
    let args: Vec<&str> = sidecar["command"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(args.first(), Some(&"sidecar"));
    assert!(args.contains(&format!("--gateway-id={}", test_harness::gateway::GATEWAY_ID).as_str()));
    assert_eq!(
        services(&c)["coding-agent"]["network_mode"],
        "service:coding-agent-sidecar"
    );
}
