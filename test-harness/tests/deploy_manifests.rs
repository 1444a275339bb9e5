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
//! - With the TLS interception components, the CA (cert-manager) is what the gateway
//!   mounts and its config names, its certificate (never its key) reaches `ai-workloads`
//!   (trust-manager), and the example agent's TLS stacks trust the mounted file.
//! - `docker-compose.yml` parses, and every file it mounts exists in the repository.
//! - Every policy shipped with the deployment passes `policy check` (and its tests),
//!   and every shipped `gateway.yaml` loads.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use egress_gateway::config::{Env, GatewayConfig, Interception, Overrides};
use egress_policy::testing::{parse_tests, run_tests};
use egress_policy::Policy;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
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
    hpas: Vec<HorizontalPodAutoscaler>,
    cluster_spiffe_ids: Vec<Value>,
    /// Prometheus Operator `ServiceMonitor`s and `PrometheusRule`s (CRDs, as values).
    service_monitors: Vec<Value>,
    prometheus_rules: Vec<Value>,
    /// cert-manager `Issuer`s and `Certificate`s, trust-manager `Bundle`s (CRDs, so
    /// checked by hand and kept as values).
    issuers: Vec<Value>,
    certificates: Vec<Value>,
    bundles: Vec<Value>,
    /// Files with manifests, relative to `deploy/kubernetes`.
    files: BTreeSet<String>,
}

fn load_manifests() -> Manifests {
    let mut m = Manifests::default();
    // A kustomize patch is a fragment of an object, not a manifest of its own.
    let patches = patch_files();
    for path in yaml_files(&k8s_dir()) {
        let docs = yaml_docs(&path);
        let manifests: Vec<&Value> = docs.iter().filter(|d| is_manifest(d)).collect();
        if manifests.is_empty()
            || path.file_name().unwrap() == "kustomization.yaml"
            || patches.contains(&path)
        {
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
            ("autoscaling/v2", "HorizontalPodAutoscaler") => self.hpas.push(strict(doc, origin)),
            ("monitoring.coreos.com/v1", "ServiceMonitor") => {
                check_service_monitor(doc, origin);
                self.service_monitors.push(doc.clone());
            }
            ("monitoring.coreos.com/v1", "PrometheusRule") => {
                check_prometheus_rule(doc, origin);
                self.prometheus_rules.push(doc.clone());
            }
            ("spire.spiffe.io/v1alpha1", "ClusterSPIFFEID") => {
                check_cluster_spiffe_id(doc, origin);
                self.cluster_spiffe_ids.push(doc.clone());
            }
            ("cert-manager.io/v1", "Issuer") => {
                check_issuer(doc, origin);
                self.issuers.push(doc.clone());
            }
            ("cert-manager.io/v1", "Certificate") => {
                check_certificate(doc, origin);
                self.certificates.push(doc.clone());
            }
            ("trust.cert-manager.io/v1alpha1", "Bundle") => {
                check_bundle(doc, origin);
                self.bundles.push(doc.clone());
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

/// Every key of `obj` is one of `known`.
fn check_keys(obj: &Value, known: &[&str], origin: &str, at: &str) {
    let map = obj
        .as_object()
        .unwrap_or_else(|| panic!("{origin}: {at} is not a mapping"));
    for k in map.keys() {
        assert!(
            known.contains(&k.as_str()),
            "{origin}: unknown field {at}.{k} (typo?)"
        );
    }
}

/// The top level of a CRD object: `apiVersion`, `kind`, `metadata` with a name (and a
/// namespace when `namespaced`), `spec`.
fn check_crd_top(doc: &Value, namespaced: bool, origin: &str) {
    check_keys(doc, &["apiVersion", "kind", "metadata", "spec"], origin, "");
    assert!(doc["metadata"]["name"].is_string(), "{origin}: no name");
    assert_eq!(
        doc["metadata"]["namespace"].is_string(),
        namespaced,
        "{origin}: metadata.namespace (namespaced: {namespaced})"
    );
    assert!(doc["spec"].is_object(), "{origin}: no spec");
}

/// cert-manager `Issuer` (cert-manager.io/v1): exactly one issuer type.
fn check_issuer(doc: &Value, origin: &str) {
    check_crd_top(doc, true, origin);
    let types = ["acme", "ca", "selfSigned", "vault", "venafi"];
    check_keys(&doc["spec"], &types, origin, "spec");
    assert_eq!(
        doc["spec"].as_object().unwrap().len(),
        1,
        "{origin}: an Issuer has exactly one type"
    );
}

/// cert-manager `Certificate` (cert-manager.io/v1 `CertificateSpec`).
fn check_certificate(doc: &Value, origin: &str) {
    check_crd_top(doc, true, origin);
    let spec = &doc["spec"];
    check_keys(
        spec,
        &[
            "additionalOutputFormats",
            "commonName",
            "dnsNames",
            "duration",
            "emailAddresses",
            "encodeUsagesInRequest",
            "ipAddresses",
            "isCA",
            "issuerRef",
            "keystores",
            "literalSubject",
            "nameConstraints",
            "otherNames",
            "privateKey",
            "renewBefore",
            "renewBeforePercentage",
            "revisionHistoryLimit",
            "secretName",
            "secretTemplate",
            "signatureAlgorithm",
            "subject",
            "uris",
            "usages",
        ],
        origin,
        "spec",
    );
    assert!(spec["secretName"].is_string(), "{origin}: spec.secretName");
    check_keys(
        &spec["issuerRef"],
        &["name", "kind", "group"],
        origin,
        "spec.issuerRef",
    );
    assert!(
        spec["issuerRef"]["name"].is_string(),
        "{origin}: issuerRef.name"
    );
    if let Some(key) = spec.get("privateKey") {
        check_keys(
            key,
            &["algorithm", "encoding", "rotationPolicy", "size"],
            origin,
            "spec.privateKey",
        );
        for (field, allowed) in [
            ("algorithm", &["RSA", "ECDSA", "Ed25519"][..]),
            ("encoding", &["PKCS1", "PKCS8"][..]),
            ("rotationPolicy", &["Never", "Always"][..]),
        ] {
            if let Some(v) = key.get(field) {
                assert!(
                    v.as_str().is_some_and(|v| allowed.contains(&v)),
                    "{origin}: spec.privateKey.{field} {v} is not one of {allowed:?}"
                );
            }
        }
    }
    if let Some(subject) = spec.get("subject") {
        check_keys(
            subject,
            &[
                "countries",
                "localities",
                "organizationalUnits",
                "organizations",
                "postalCodes",
                "provinces",
                "serialNumber",
                "streetAddresses",
            ],
            origin,
            "spec.subject",
        );
    }
    if let Some(t) = spec.get("secretTemplate") {
        check_keys(t, &["annotations", "labels"], origin, "spec.secretTemplate");
    }
    let usages = [
        "signing",
        "digital signature",
        "content commitment",
        "key encipherment",
        "key agreement",
        "data encipherment",
        "cert sign",
        "crl sign",
        "encipher only",
        "decipher only",
        "any",
        "server auth",
        "client auth",
        "code signing",
        "email protection",
        "s/mime",
        "ipsec end system",
        "ipsec tunnel",
        "ipsec user",
        "timestamping",
        "ocsp signing",
        "microsoft sgc",
        "netscape sgc",
    ];
    for u in spec["usages"].as_array().into_iter().flatten() {
        assert!(
            u.as_str().is_some_and(|u| usages.contains(&u)),
            "{origin}: unknown usage {u}"
        );
    }
    for field in ["duration", "renewBefore"] {
        if let Some(d) = spec.get(field) {
            go_duration(d.as_str().unwrap_or_default())
                .unwrap_or_else(|| panic!("{origin}: spec.{field} {d} is not a Go duration"));
        }
    }
}

/// Prometheus Operator `ServiceMonitor` (monitoring.coreos.com/v1), the fields used here.
fn check_service_monitor(doc: &Value, origin: &str) {
    check_crd_top(doc, true, origin);
    let spec = &doc["spec"];
    check_keys(
        spec,
        &[
            "endpoints",
            "namespaceSelector",
            "selector",
            "jobLabel",
            "targetLabels",
            "podTargetLabels",
            "sampleLimit",
            "scrapeProtocols",
        ],
        origin,
        "spec",
    );
    let _: LabelSelector = strict(&spec["selector"], &format!("{origin}: spec.selector"));
    let endpoints = spec["endpoints"].as_array().expect("spec.endpoints");
    assert!(!endpoints.is_empty(), "{origin}: no endpoints");
    for (i, e) in endpoints.iter().enumerate() {
        check_keys(
            e,
            &[
                "port",
                "path",
                "scheme",
                "interval",
                "scrapeTimeout",
                "honorLabels",
                "relabelings",
                "metricRelabelings",
            ],
            origin,
            &format!("spec.endpoints[{i}]"),
        );
        for field in ["interval", "scrapeTimeout"] {
            if let Some(d) = e.get(field) {
                go_duration(d.as_str().unwrap_or_default())
                    .unwrap_or_else(|| panic!("{origin}: {field} {d} is not a duration"));
            }
        }
    }
    if let Some(ns) = spec.get("namespaceSelector") {
        check_keys(ns, &["any", "matchNames"], origin, "spec.namespaceSelector");
    }
}

/// Prometheus Operator `PrometheusRule`: groups of alerting rules, each with the
/// fields Prometheus reads (the expressions themselves are checked by promtool).
fn check_prometheus_rule(doc: &Value, origin: &str) {
    check_crd_top(doc, true, origin);
    check_keys(&doc["spec"], &["groups"], origin, "spec");
    let groups = doc["spec"]["groups"].as_array().expect("spec.groups");
    assert!(!groups.is_empty(), "{origin}: no groups");
    for (g, group) in groups.iter().enumerate() {
        check_keys(
            group,
            &["name", "interval", "rules"],
            origin,
            &format!("groups[{g}]"),
        );
        for (r, rule) in group["rules"].as_array().expect("rules").iter().enumerate() {
            let at = format!("groups[{g}].rules[{r}]");
            check_keys(
                rule,
                &[
                    "alert",
                    "record",
                    "expr",
                    "for",
                    "keep_firing_for",
                    "labels",
                    "annotations",
                ],
                origin,
                &at,
            );
            assert!(rule["expr"].is_string(), "{origin}: {at}.expr");
            if rule.get("alert").is_some() {
                let severity = rule["labels"]["severity"].as_str();
                assert!(
                    matches!(severity, Some("critical" | "warning")),
                    "{origin}: {at}: labels.severity critical or warning, not {severity:?}"
                );
                for a in ["summary", "description"] {
                    assert!(
                        rule["annotations"][a].is_string(),
                        "{origin}: {at}: annotations.{a}"
                    );
                }
            }
        }
    }
}

/// trust-manager `Bundle` (trust.cert-manager.io/v1alpha1), cluster-scoped.
fn check_bundle(doc: &Value, origin: &str) {
    check_crd_top(doc, false, origin);
    let spec = &doc["spec"];
    check_keys(spec, &["sources", "target"], origin, "spec");
    let sources = spec["sources"].as_array().expect("spec.sources");
    assert!(!sources.is_empty(), "{origin}: no sources");
    for (i, src) in sources.iter().enumerate() {
        let at = format!("spec.sources[{i}]");
        check_keys(
            src,
            &["configMap", "secret", "inLine", "useDefaultCAs"],
            origin,
            &at,
        );
        assert_eq!(
            src.as_object().unwrap().len(),
            1,
            "{origin}: {at} has exactly one source"
        );
        for kind in ["configMap", "secret"] {
            if let Some(r) = src.get(kind) {
                check_keys(
                    r,
                    &["name", "key", "selector", "includeAllKeys"],
                    origin,
                    &format!("{at}.{kind}"),
                );
            }
        }
    }
    let target = &spec["target"];
    check_keys(
        target,
        &[
            "configMap",
            "secret",
            "additionalFormats",
            "namespaceSelector",
        ],
        origin,
        "spec.target",
    );
    for kind in ["configMap", "secret"] {
        if let Some(t) = target.get(kind) {
            check_keys(
                t,
                &["key", "metadata"],
                origin,
                &format!("spec.target.{kind}"),
            );
            assert!(t["key"].is_string(), "{origin}: spec.target.{kind}.key");
        }
    }
    if let Some(sel) = target.get("namespaceSelector") {
        let _: LabelSelector = strict(sel, &format!("{origin}: spec.target.namespaceSelector"));
    }
}

/// A Go `time.ParseDuration` string made of `h`, `m` and `s` parts (`8760h`, `1h30m`).
fn go_duration(s: &str) -> Option<std::time::Duration> {
    let mut total = 0u64;
    let mut digits = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let n: u64 = std::mem::take(&mut digits).parse().ok()?;
        total += n * match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return None,
        };
    }
    (digits.is_empty() && !s.is_empty()).then(|| std::time::Duration::from_secs(total))
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

/// Every file a kustomization or component names under `patches` (`path:` entries).
fn patch_files() -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    for (path, k) in kustomizations() {
        let dir = path.parent().unwrap();
        for p in k["patches"].as_array().into_iter().flatten() {
            if let Some(file) = p["path"].as_str() {
                out.insert(dir.join(file));
            }
        }
    }
    out
}

/// `name` of a configMapGenerator entry that creates the ConfigMap (not a component's
/// `behavior: replace` or `merge`): (file key -> source path, hash disabled).
fn config_map_generator(name: &str) -> (BTreeMap<String, String>, bool) {
    for (_, k) in kustomizations() {
        for g in k["configMapGenerator"].as_array().into_iter().flatten() {
            let creates = g["behavior"].as_str().is_none_or(|b| b == "create");
            if g["name"] == name && creates {
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
        .find(|(_, d)| {
            namespace_of(&d.metadata) == GATEWAY_NS
                && d.metadata.name.as_deref() == Some("egress-gateway")
        })
        .expect("the Deployment egress-gateway in the egress-gateway namespace");
    (origin, d)
}

/// The gateway's Service (the namespace may hold others, such as Redis's).
fn gateway_service(m: &Manifests) -> &Service {
    m.services
        .iter()
        .find(|s| {
            namespace_of(&s.metadata) == GATEWAY_NS
                && s.metadata.name.as_deref() == Some("egress-gateway")
        })
        .expect("Service egress-gateway")
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
    // The interception component's CA lives with the gateway (the Bundle is
    // cluster-scoped; check_bundle checks that it names no namespace).
    assert_eq!(m.certificates.len(), 1, "the interception CA");
    assert_eq!(m.bundles.len(), 1, "the interception CA's Bundle");
    for doc in m.issuers.iter().chain(&m.certificates) {
        assert_eq!(
            doc["metadata"]["namespace"], GATEWAY_NS,
            "{}",
            doc["metadata"]["name"]
        );
    }
}

#[test]
fn kustomizations_list_every_manifest_and_every_file_they_name_exists() {
    let m = load_manifests();
    let mut listed = BTreeSet::new();
    for (path, k) in kustomizations() {
        let dir = path.parent().unwrap();
        // Kustomizations (kubectl apply -k) and the opt-in components they may list.
        let api = if k["kind"] == "Component" {
            "kustomize.config.k8s.io/v1alpha1"
        } else {
            assert_eq!(k["kind"], "Kustomization", "{}", rel(&path));
            assert!(
                k["resources"].as_array().is_some_and(|r| !r.is_empty()),
                "{}: no resources",
                rel(&path)
            );
            "kustomize.config.k8s.io/v1beta1"
        };
        assert_eq!(k["apiVersion"], api, "{}", rel(&path));
        for c in k["components"].as_array().into_iter().flatten() {
            let c = c.as_str().unwrap();
            let comp = dir.join(c).join("kustomization.yaml");
            assert!(
                comp.is_file() && yaml_docs(&comp)[0]["kind"] == "Component",
                "{}: component {c} is not a directory with a Component",
                rel(&path)
            );
        }
        for p in k["patches"].as_array().into_iter().flatten() {
            if let Some(file) = p["path"].as_str() {
                assert!(
                    dir.join(file).is_file(),
                    "{}: patch {file} does not exist",
                    rel(&path)
                );
            }
        }
        for r in k["resources"].as_array().into_iter().flatten() {
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
    check_pod_security(&load_manifests());
}

/// Both namespaces carry the `restricted` labels, and every pod passes the profile.
fn check_pod_security(m: &Manifests) {
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
    check_gateway_deployment(&load_manifests(), &gateway_config());
}

fn check_gateway_deployment(m: &Manifests, cfg: &GatewayConfig) {
    let (origin, d) = gateway_deployment(m);
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

    // Endpoints drain before the listener stops: a preStop delay (the sleep action, as
    // the image has no shell) keeps accepting while the pod leaves the Service.
    let c = gateway_container(d);
    let pre_stop = c
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
        .unwrap_or_else(|| panic!("{origin}: no preStop hook"));
    assert!(
        pre_stop.exec.is_none(),
        "{origin}: the distroless image has no shell for an exec preStop"
    );
    let delay = pre_stop
        .sleep
        .as_ref()
        .unwrap_or_else(|| panic!("{origin}: preStop is not a sleep action"))
        .seconds;
    assert!(
        (3..=15).contains(&delay),
        "{origin}: preStop sleeps {delay}s"
    );

    // The grace period covers the delay and then the gateway's own drain.
    let grace = pod.termination_grace_period_seconds.unwrap_or(30);
    assert!(
        u64::try_from(grace).unwrap()
            > u64::try_from(delay).unwrap() + cfg.shutdown_grace.as_secs(),
        "{origin}: terminationGracePeriodSeconds {grace} <= preStop {delay}s + shutdown_grace"
    );
    if let Some(class) = &pod.priority_class_name {
        assert!(!class.is_empty(), "{origin}: an empty priorityClassName");
    }

    // The HPA scales this Deployment on CPU, never below the replicas the
    // PodDisruptionBudget and the anti-affinity are sized for.
    let hpa = m
        .hpas
        .iter()
        .find(|h| namespace_of(&h.metadata) == GATEWAY_NS)
        .expect("a HorizontalPodAutoscaler for the gateway");
    let hpa_spec = hpa.spec.as_ref().unwrap();
    assert_eq!(hpa_spec.scale_target_ref.kind, "Deployment");
    assert_eq!(hpa_spec.scale_target_ref.name, "egress-gateway");
    let min = hpa_spec.min_replicas.unwrap_or(1);
    assert!(
        min >= 2 && min <= hpa_spec.max_replicas,
        "HPA: minReplicas {min}, maxReplicas {}",
        hpa_spec.max_replicas
    );
    let cpu_target = hpa_spec
        .metrics
        .iter()
        .flatten()
        .filter_map(|m| m.resource.as_ref())
        .find(|r| r.name == "cpu")
        .and_then(|r| r.target.average_utilization)
        .expect("HPA: a CPU utilization target");
    assert!((30..=90).contains(&cpu_target), "HPA: cpu {cpu_target}%");
    // Utilization is a share of the request: the container must have one.
    let requests = c
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .cloned()
        .unwrap_or_default();
    assert!(
        requests.contains_key("cpu"),
        "{origin}: a CPU request for the HPA"
    );
}

#[test]
fn gateway_probes_use_the_admin_port_and_the_config_binds_it_on_the_pod_ip() {
    check_probes(&load_manifests(), &gateway_config());
}

fn check_probes(m: &Manifests, cfg: &GatewayConfig) {
    let (origin, d) = gateway_deployment(m);
    let c = gateway_container(d);
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
    let policy = yaml_docs(&k8s_dir().join("config/policy.yaml")).remove(0);
    check_gateway_mounts(&m, &gateway_config(), &policy);
    let (origin, d) = gateway_deployment(&m);
    let pod = pod_spec(d);
    let c = gateway_container(d);

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
    let (files, no_hash) = config_map_generator("egress-gateway-policy");
    assert!(files.contains_key("policy.yaml"));
    assert!(
        no_hash,
        "the policy ConfigMap keeps its name, so updates reach the mounted file live"
    );
    let policy_dir = mount_path(c, &volume_for("egress-gateway-policy"));
    assert_eq!(
        gateway_config().policy,
        Path::new(policy_dir).join("policy.yaml")
    );
    // The example Secret is the one the credential's volume names.
    for v in pod.volumes.iter().flatten() {
        if let Some(secret) = v.secret.as_ref().filter(|s| s.optional == Some(true)) {
            assert!(
                m.secrets
                    .iter()
                    .any(|s| s.metadata.name == secret.secret_name),
                "{origin}: optional Secret {:?} has no example",
                secret.secret_name
            );
        }
    }
}

/// The Workload API socket through the CSI driver at the config's path, `run --config`,
/// the policy from a mounted ConfigMap volume at the config's path, and every injected
/// credential file on a mounted Secret volume.
fn check_gateway_mounts(m: &Manifests, cfg: &GatewayConfig, policy: &Value) {
    let (origin, d) = gateway_deployment(m);
    let pod = pod_spec(d);
    let c = gateway_container(d);

    let csi = spiffe_csi_volume(pod, origin);
    let socket_dir = mount_path(c, &csi);
    assert!(
        cfg.workload_api
            .starts_with(&format!("unix://{}/", socket_dir.trim_end_matches('/'))),
        "{origin}: workload_api {} is not in the CSI mount {socket_dir}",
        cfg.workload_api
    );
    assert_eq!(
        c.args
            .as_deref()
            .unwrap_or_default()
            .first()
            .map(String::as_str),
        Some("run")
    );
    assert!(arg_value(c, "--config").is_some(), "{origin}: --config");

    let volume_at = |dir: &Path| {
        let mount = c
            .volume_mounts
            .iter()
            .flatten()
            .find(|vm| Path::new(&vm.mount_path) == dir)
            .unwrap_or_else(|| panic!("{origin}: nothing mounted at {}", dir.display()));
        assert_eq!(mount.read_only, Some(true), "{origin}: {}", mount.name);
        pod.volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .unwrap_or_else(|| panic!("{origin}: no volume {}", mount.name))
    };
    assert!(
        volume_at(cfg.policy.parent().unwrap()).config_map.is_some(),
        "{origin}: the policy comes from a ConfigMap"
    );

    // Every injected credential file is on a mounted Secret.
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
                && pod
                    .volumes
                    .iter()
                    .flatten()
                    .any(|v| v.name == vm.name && v.secret.is_some())
        });
        assert!(mounted, "{origin}: {f} is not on a mounted Secret");
    }
}

#[test]
fn service_and_disruption_budget_select_the_gateway() {
    check_service_and_pdb(&load_manifests());
}

fn check_service_and_pdb(m: &Manifests) {
    let (_, d) = gateway_deployment(m);
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
fn agents_reach_only_the_gateway_and_dns_only_when_labelled() {
    check_agent_network_policies(&load_manifests());
}

/// Agents reach the gateway's mTLS port and nothing else; DNS (a tunnel out) only in a
/// policy that selects pods by a label, so an agent without it gets none.
fn check_agent_network_policies(m: &Manifests) {
    let (_, d) = gateway_deployment(m);
    let gateway_labels = pod_labels(d);
    let policies = policies_in(m, AGENTS_NS);
    assert!(
        has_default_deny(&policies),
        "ai-workloads: a default-deny policy"
    );
    let mut reaches_gateway = false;
    let mut dns_opt_in = false;
    for p in &policies {
        let name = p.metadata.name.clone().unwrap_or_default();
        let spec = p.spec.as_ref().unwrap();
        assert!(
            spec.ingress.as_ref().is_none_or(Vec::is_empty),
            "ai-workloads/{name}: agents accept no connections"
        );
        let selects_by_label = spec
            .pod_selector
            .as_ref()
            .and_then(|s| s.match_labels.as_ref())
            .is_some_and(|l| !l.is_empty());
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
                    assert!(
                        selects_by_label,
                        "ai-workloads/{name}: DNS for every agent (a tunnel out); select the \
                         pods that need it by a label"
                    );
                    dns_opt_in = true;
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
    assert!(dns_opt_in, "a documented way for agents that need DNS");
    // An agent pod with no opt-in label gets no DNS from any policy.
    let plain = BTreeMap::from([(
        "app.kubernetes.io/name".to_string(),
        "some-agent".to_string(),
    )]);
    for p in &policies {
        let spec = p.spec.as_ref().unwrap();
        let applies = spec
            .pod_selector
            .as_ref()
            .is_none_or(|s| labels_match(s, &plain));
        let dns = spec
            .egress
            .iter()
            .flatten()
            .flat_map(|r| r.to.iter().flatten())
            .any(is_dns);
        assert!(
            !(applies && dns),
            "ai-workloads/{}: gives an unlabelled agent DNS",
            p.metadata.name.as_deref().unwrap_or_default()
        );
    }
}

#[test]
fn the_gateway_is_reached_only_from_agents_and_reaches_only_the_internet() {
    check_gateway_network_policies(&load_manifests());
}

/// The gateway accepts agents on 8443 and Prometheus on 9901 only, and reaches the
/// internet (never private, metadata, CGNAT or NAT64 ranges), kube-dns and named
/// in-cluster peers. Other pods of its namespace (Redis) accept only the gateway and
/// send nothing.
fn check_gateway_network_policies(m: &Manifests) {
    let (_, d) = gateway_deployment(m);
    let gateway_labels = pod_labels(d);
    let policies = policies_in(m, GATEWAY_NS);
    assert!(
        has_default_deny(&policies),
        "egress-gateway: a default-deny policy"
    );
    let mut from_agents = false;
    let mut internet = false;
    for p in &policies {
        let name = p.metadata.name.clone().unwrap_or_default();
        let spec = p.spec.as_ref().unwrap();
        let for_gateway = spec
            .pod_selector
            .as_ref()
            .is_none_or(|s| labels_match(s, &gateway_labels));
        if !for_gateway {
            assert!(
                spec.egress.as_ref().is_none_or(Vec::is_empty),
                "egress-gateway/{name}: only the gateway's pods get egress rules"
            );
            for rule in spec.ingress.iter().flatten() {
                let peers = rule.from.as_ref().filter(|f| !f.is_empty());
                let peers =
                    peers.unwrap_or_else(|| panic!("egress-gateway/{name}: ingress from anywhere"));
                assert!(
                    rule_ports(rule.ports.as_ref()).is_some(),
                    "egress-gateway/{name}: ingress on every port"
                );
                for peer in peers {
                    let gateway_only = peer
                        .namespace_selector
                        .as_ref()
                        .is_some_and(|s| selects_namespace(s, GATEWAY_NS))
                        && peer.pod_selector.as_ref().is_some_and(|s| {
                            s.match_labels.as_ref().is_some_and(|l| !l.is_empty())
                                && labels_match(s, &gateway_labels)
                        });
                    assert!(
                        gateway_only,
                        "egress-gateway/{name}: accepts something other than the gateway: {peer:?}"
                    );
                }
            }
            continue;
        }
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
                        &[
                            "fc00::/7",
                            "fe80::/10",
                            "::1/128",
                            // IPv4-mapped and NAT64 addresses reach IPv4, private too.
                            "::ffff:0:0/96",
                            "64:ff9b::/96",
                            "64:ff9b:1::/48",
                        ]
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
    let policy = yaml_docs(&k8s_dir().join("config/policy.yaml")).remove(0);
    let agents = check_cluster_spiffe_ids(&load_manifests(), &policy);
    assert!(agents >= 1, "an example agent Deployment");
}

/// Returns how many agent Deployments it checked.
fn check_cluster_spiffe_ids(m: &Manifests, policy_yaml: &Value) -> usize {
    let (_, d) = gateway_deployment(m);
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
    let policy_ids: BTreeSet<&str> = policy_yaml["agents"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["id"].as_str())
        .collect();
    assert!(!policy_ids.is_empty());

    // Every agent Deployment's ID is one the policy names, and its sidecar accepts
    // exactly the gateway's ID at the Service's address.
    let svc = gateway_service(m);
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
    agent_deployments
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

/// The YAML files under the shipped folders; a Helm chart's templates are Go templates
/// (rendered and checked by the Helm tests), not YAML.
fn shipped_yaml_files() -> Vec<PathBuf> {
    shipped_dirs()
        .iter()
        .flat_map(|d| yaml_files(d))
        .filter(|p| !p.components().any(|c| c.as_os_str() == "templates"))
        .collect()
}

#[test]
fn every_shipped_policy_passes_policy_check_and_its_tests() {
    let mut checked = 0;
    for path in shipped_yaml_files() {
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
    for path in shipped_yaml_files() {
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
    tool(
        "kustomize",
        "EGRESS_KUSTOMIZE",
        "scripts/install-kustomize.sh",
    )
}

/// helm, built by `scripts/install-helm.sh`.
fn helm() -> Option<PathBuf> {
    tool("helm", "EGRESS_HELM", "scripts/install-helm.sh")
}

/// promtool, built by `scripts/install-promtool.sh`.
fn promtool() -> Option<PathBuf> {
    tool("promtool", "EGRESS_PROMTOOL", "scripts/install-promtool.sh")
}

/// A tool the install scripts build: `$env_var`, then
/// ~/.cache/egress-gateway/bin/NAME, then PATH; `None` after a loud message when it is
/// missing (a failure where the dependencies are required).
fn tool(name: &str, env_var: &str, script: &str) -> Option<PathBuf> {
    let candidates = std::env::var_os(env_var)
        .map(PathBuf::from)
        .into_iter()
        .chain(std::env::var_os("HOME").map(|h| {
            PathBuf::from(h)
                .join(".cache/egress-gateway/bin")
                .join(name)
        }))
        .chain(std::env::var_os("PATH").into_iter().flat_map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .collect::<Vec<_>>()
        }));
    for c in candidates {
        if c.is_file() {
            return Some(c);
        }
    }
    assert!(
        !test_harness::deps_required(),
        "{name} is required here ({script} builds it)"
    );
    eprintln!("SKIPPED: {name} not installed ({script})");
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
    assert_eq!(
        rendered.deployments.len(),
        1,
        "the gateway alone (Redis is opt-in)"
    );
    gateway_deployment(&rendered);
    assert!(rendered.secrets.is_empty());
    // Shared limits and the Prometheus Operator objects are opt-in too.
    assert!(
        rendered.service_monitors.is_empty() && rendered.prometheus_rules.is_empty(),
        "the base needs no Prometheus Operator CRDs"
    );
    assert_eq!(rendered.hpas.len(), 1);
    // Interception is opt-in: the base needs neither cert-manager nor trust-manager.
    assert!(
        rendered.certificates.is_empty()
            && rendered.issuers.is_empty()
            && rendered.bundles.is_empty(),
        "the base renders no cert-manager or trust-manager objects"
    );
    assert_eq!(
        rendered.network_policies.len(),
        yaml_docs(&k8s_dir().join("networkpolicies.yaml")).len()
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

// === TLS interception (components, rendered by the real kustomize) ===

const INTERCEPTION_TRUST_VARS: [&str; 4] = [
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "CURL_CA_BUNDLE",
];

/// `kustomize build` of a throwaway overlay, as an operator opts in to a component:
/// `resources` and `components` are directories relative to `deploy/kubernetes` ("" is
/// the base). Parsed, typed and checked like the shipped files.
fn render_overlay(bin: &Path, resources: &[&str], components: &[&str]) -> (Manifests, Vec<Value>) {
    let overlay = tempfile::tempdir().unwrap();
    let from = overlay.path().canonicalize().unwrap();
    // kustomize refuses absolute paths: climb from the overlay to /, then go down.
    let up: Vec<&str> = from.components().skip(1).map(|_| "..").collect();
    let k8s = k8s_dir().canonicalize().unwrap();
    let to = |p: &&str| {
        let target = if p.is_empty() {
            k8s.clone()
        } else {
            k8s.join(p)
        };
        format!("{}{}", up.join("/"), target.display())
    };
    let kustomization = serde_json::json!({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": resources.iter().map(to).collect::<Vec<_>>(),
        "components": components.iter().map(to).collect::<Vec<_>>(),
    });
    std::fs::write(
        overlay.path().join("kustomization.yaml"),
        serde_json::to_string_pretty(&kustomization).unwrap(),
    )
    .unwrap();
    let docs = kustomize_build(bin, overlay.path());
    let what = format!("kustomize build of resources {resources:?} + components {components:?}");
    let mut m = Manifests::default();
    for (i, doc) in docs.iter().enumerate() {
        m.add(doc, &format!("{what} (document {})", i + 1));
    }
    for (origin, d) in &m.deployments {
        check_restricted(pod_spec(d), origin);
    }
    (m, docs)
}

/// The rendered ConfigMap named `name`.
fn rendered_config_map<'a>(m: &'a Manifests, name: &str) -> &'a ConfigMap {
    m.config_maps
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no rendered ConfigMap {name}"))
}

/// The gateway.yaml the rendered gateway Deployment reads: the file `--config` names,
/// from the ConfigMap volume mounted at its directory.
fn rendered_gateway_yaml(m: &Manifests) -> String {
    let (origin, d) = gateway_deployment(m);
    let c = gateway_container(d);
    let config = Path::new(arg_value(c, "--config").expect("--config"));
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|vm| Path::new(&vm.mount_path) == config.parent().unwrap())
        .unwrap_or_else(|| panic!("{origin}: nothing mounted at {}", config.display()));
    let cm = pod_spec(d)
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .and_then(|v| v.config_map.as_ref())
        .unwrap_or_else(|| panic!("{origin}: {} is not a ConfigMap volume", mount.name));
    let file = config.file_name().unwrap().to_str().unwrap();
    rendered_config_map(m, &cm.name)
        .data
        .as_ref()
        .and_then(|d| d.get(file))
        .unwrap_or_else(|| panic!("ConfigMap {} has no {file}", cm.name))
        .clone()
}

fn yaml_value(text: &str, origin: &str) -> Value {
    serde_saphyr::from_str(text).unwrap_or_else(|e| panic!("{origin}: not valid YAML: {e}"))
}

/// Checks the gateway's side of interception in a rendered overlay: the Deployment
/// mounts Secret `secret` read-only with tls.crt -> ca.crt and tls.key -> ca.key, the
/// config's `interception` block names exactly those files and is the only change to
/// the base's gateway.yaml, and the gateway's own loader reads it so. Returns what the
/// gateway loaded.
fn check_gateway_interception(m: &Manifests, secret: &str) -> Interception {
    let (origin, d) = gateway_deployment(m);
    let c = gateway_container(d);
    let volume = pod_spec(d)
        .volumes
        .iter()
        .flatten()
        .find(|v| {
            v.secret
                .as_ref()
                .is_some_and(|s| s.secret_name.as_deref() == Some(secret))
        })
        .unwrap_or_else(|| panic!("{origin}: no volume for the CA Secret {secret}"));
    let src = volume.secret.as_ref().unwrap();
    assert_ne!(
        src.optional,
        Some(true),
        "{origin}: the gateway must not start without its interception CA"
    );
    let items: BTreeMap<&str, &str> = src
        .items
        .iter()
        .flatten()
        .map(|i| (i.key.as_str(), i.path.as_str()))
        .collect();
    assert_eq!(
        items,
        BTreeMap::from([("tls.crt", "ca.crt"), ("tls.key", "ca.key")]),
        "{origin}: the kubernetes.io/tls keys, mapped to the names the config uses"
    );
    let mode = src.default_mode.unwrap_or(0o644);
    assert_eq!(
        mode & 0o007,
        0,
        "{origin}: the CA key is not world-readable"
    );
    let dir = mount_path(c, &volume.name);
    let vm = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|vm| vm.name == volume.name)
        .unwrap();
    assert!(
        vm.sub_path.is_none() && vm.sub_path_expr.is_none(),
        "{origin}: no subPath, so a renewed CA reaches the mounted files"
    );

    let text = rendered_gateway_yaml(m);
    let mut cfg = yaml_value(&text, "the rendered gateway.yaml");
    let block = cfg
        .as_object_mut()
        .unwrap()
        .remove("interception")
        .expect("the rendered gateway.yaml has an `interception` block");
    check_keys(
        &block,
        &["ca_cert", "ca_key", "leaf_ttl"],
        "gateway.yaml",
        "interception",
    );
    assert_eq!(
        block["ca_cert"],
        format!("{dir}/ca.crt"),
        "interception.ca_cert"
    );
    assert_eq!(
        block["ca_key"],
        format!("{dir}/ca.key"),
        "interception.ca_key"
    );
    // Everything else is the base's config/gateway.yaml, unchanged.
    let base = std::fs::read_to_string(k8s_dir().join("config/gateway.yaml")).unwrap();
    assert_eq!(
        cfg,
        yaml_value(&base, "config/gateway.yaml"),
        "the interception gateway.yaml must be config/gateway.yaml plus the `interception` \
         block (edit components/interception-ca-secret/gateway.yaml to match)"
    );

    // The gateway's own loader reads the same files from it.
    let cfg = GatewayConfig::from_yaml_str(
        &text,
        "rendered gateway.yaml (components/interception-ca-secret)",
        &Overrides::default(),
        &NoEnv,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let interception = cfg.interception.expect("the gateway loads `interception`");
    assert_eq!(interception.ca_cert, Path::new(dir).join("ca.crt"));
    assert_eq!(interception.ca_key, Path::new(dir).join("ca.key"));
    assert!(
        interception.leaf_ttl <= std::time::Duration::from_secs(7 * 86400),
        "leaf_ttl {:?}: short-lived leaves",
        interception.leaf_ttl
    );
    interception
}

#[test]
fn interception_component_mounts_a_cert_manager_ca_into_the_gateway_and_its_config() {
    let Some(bin) = kustomize() else { return };
    let (m, _) = render_overlay(&bin, &[""], &["components/interception"]);

    // One CA Certificate, in the gateway's namespace, from a self-signed Issuer there.
    assert_eq!(m.certificates.len(), 1);
    let cert = &m.certificates[0];
    let spec = &cert["spec"];
    assert_eq!(cert["metadata"]["namespace"], GATEWAY_NS);
    assert_eq!(spec["isCA"], true, "the interception Certificate is a CA");
    assert_eq!(spec["privateKey"]["algorithm"], "ECDSA");
    assert_eq!(spec["privateKey"]["size"], 256, "ECDSA P-256");
    assert!(
        spec["usages"]
            .as_array()
            .is_none_or(|u| u.iter().any(|u| u == "cert sign")),
        "a CA signs certificates"
    );
    let issuer_ref = &spec["issuerRef"];
    assert_eq!(issuer_ref["kind"], "Issuer");
    let issuer = m
        .issuers
        .iter()
        .find(|i| i["metadata"]["name"] == issuer_ref["name"])
        .unwrap_or_else(|| panic!("no Issuer {}", issuer_ref["name"]));
    assert_eq!(issuer["metadata"]["namespace"], GATEWAY_NS);
    assert!(
        issuer["spec"]["selfSigned"].is_object(),
        "a self-signed Issuer"
    );

    // The Secret it writes is the one the gateway mounts, at the paths its config names.
    let secret = spec["secretName"].as_str().unwrap();
    assert_eq!(secret, "egress-gateway-interception-ca");
    let loaded = check_gateway_interception(&m, secret);

    // Lifetimes: renewed well before it ends, and a leaf minted just before renewal
    // never outlives the CA.
    let duration = go_duration(spec["duration"].as_str().expect("spec.duration")).unwrap();
    let renew = go_duration(spec["renewBefore"].as_str().expect("spec.renewBefore")).unwrap();
    let leaf_ttl = loaded.leaf_ttl;
    let day = std::time::Duration::from_secs(86400);
    assert!(duration >= 90 * day, "CA duration {duration:?}");
    assert!(
        renew >= 7 * day && renew < duration / 2,
        "renewBefore {renew:?}"
    );
    assert!(
        renew > leaf_ttl,
        "renewBefore {renew:?} <= leaf_ttl {leaf_ttl:?}"
    );
}

#[test]
fn interception_with_your_own_ca_secret_mounts_it_without_cert_manager() {
    let Some(bin) = kustomize() else { return };
    let (m, _) = render_overlay(&bin, &[""], &["components/interception-ca-secret"]);
    assert!(
        m.certificates.is_empty() && m.issuers.is_empty() && m.bundles.is_empty(),
        "bring-your-own-CA needs neither cert-manager nor trust-manager"
    );
    assert!(m.secrets.is_empty(), "the CA's Secret is never in git");
    check_gateway_interception(&m, "egress-gateway-interception-ca");
}

#[test]
fn interception_ca_certificate_reaches_ai_workloads_without_its_key() {
    let Some(bin) = kustomize() else { return };
    let (m, docs) = render_overlay(&bin, &[""], &["components/interception"]);
    let secret = m.certificates[0]["spec"]["secretName"].as_str().unwrap();

    assert_eq!(m.bundles.len(), 1, "one trust-manager Bundle");
    let bundle = &m.bundles[0];
    let sources = bundle["spec"]["sources"].as_array().unwrap();
    // The CA's certificate, by a key that holds no private key.
    let from_secret: Vec<&Value> = sources.iter().filter_map(|s| s.get("secret")).collect();
    assert_eq!(from_secret.len(), 1, "{sources:?}");
    assert_eq!(
        from_secret[0]["name"], secret,
        "the Bundle reads the CA's Secret"
    );
    assert!(
        ["tls.crt", "ca.crt"].contains(&from_secret[0]["key"].as_str().unwrap_or_default()),
        "the Bundle takes the certificate (tls.crt or ca.crt), never tls.key: {}",
        from_secret[0]
    );
    assert_ne!(
        from_secret[0]["includeAllKeys"], true,
        "includeAllKeys would copy tls.key too"
    );
    // The public roots as well: SSL_CERT_FILE replaces the agents' system store.
    assert!(
        sources.iter().any(|s| s["useDefaultCAs"] == true),
        "the bundle must carry the public roots (useDefaultCAs: true)"
    );

    // A ConfigMap (never a Secret), in ai-workloads and nowhere the selector misses.
    let target = &bundle["spec"]["target"];
    assert!(
        target["secret"].is_null(),
        "the CA is published in ConfigMaps"
    );
    assert_eq!(target["configMap"]["key"], "ca.crt");
    let selector: LabelSelector =
        serde_json::from_value(target["namespaceSelector"].clone()).expect("namespaceSelector");
    assert!(
        selector
            .match_labels
            .as_ref()
            .is_some_and(|l| !l.is_empty()),
        "an empty selector would publish into every namespace"
    );
    let selected: Vec<&str> = m
        .namespaces
        .iter()
        .filter(|ns| labels_match(&selector, &ns.metadata.labels.clone().unwrap_or_default()))
        .filter_map(|ns| ns.metadata.name.as_deref())
        .collect();
    assert!(
        selected.contains(&AGENTS_NS),
        "the Bundle's namespaceSelector must select {AGENTS_NS} (selects {selected:?})"
    );

    // Nothing rendered carries a private key (the CA's key exists only in the Secret
    // cert-manager writes in the gateway's namespace).
    for doc in &docs {
        let text = serde_json::to_string(doc).unwrap();
        assert!(
            !text.contains("PRIVATE KEY"),
            "{} {} holds a private key",
            doc["kind"],
            doc["metadata"]["name"]
        );
    }
}

#[test]
fn the_example_agent_trusts_the_interception_ca_from_the_published_config_map() {
    let Some(bin) = kustomize() else { return };
    let (gw, _) = render_overlay(&bin, &[""], &["components/interception"]);
    let bundle = &gw.bundles[0];
    let config_map = bundle["metadata"]["name"].as_str().unwrap();
    let key = bundle["spec"]["target"]["configMap"]["key"]
        .as_str()
        .unwrap();

    // Without the component the example agent is unchanged (the base works without a CA).
    let (plain, _) = render_overlay(&bin, &["example-agent"], &[]);
    for (origin, d) in &plain.deployments {
        for c in &pod_spec(d).containers {
            for e in c.env.iter().flatten() {
                assert!(
                    !INTERCEPTION_TRUST_VARS.contains(&e.name.as_str()),
                    "{origin}: {} sets {} without the interception component",
                    c.name,
                    e.name
                );
            }
        }
    }

    let (agent, _) = render_overlay(&bin, &["example-agent"], &["example-agent/interception"]);
    let agents: Vec<_> = agent
        .deployments
        .iter()
        .filter(|(_, d)| namespace_of(&d.metadata) == AGENTS_NS)
        .collect();
    assert_eq!(agents.len(), 1);
    for (origin, d) in agents {
        let pod = pod_spec(d);
        check_sidecar(
            origin,
            pod,
            test_harness::gateway::GATEWAY_ID,
            "egress-gateway.egress-gateway.svc:8443",
        );
        for c in &pod.containers {
            let env: BTreeMap<&str, &str> = c
                .env
                .iter()
                .flatten()
                .filter_map(|e| Some((e.name.as_str(), e.value.as_deref()?)))
                .collect();
            let files: BTreeSet<&str> = INTERCEPTION_TRUST_VARS
                .iter()
                .map(|var| {
                    *env.get(var)
                        .unwrap_or_else(|| panic!("{origin}: container {} sets no {var}", c.name))
                })
                .collect();
            assert_eq!(
                files.len(),
                1,
                "{origin}: one trust file for all: {files:?}"
            );
            let file = Path::new(files.first().unwrap());

            // The file is inside a read-only mount of a volume from that ConfigMap,
            // and is the Bundle's key.
            let mount = c
                .volume_mounts
                .iter()
                .flatten()
                .find(|vm| file.parent() == Some(Path::new(vm.mount_path.trim_end_matches('/'))))
                .unwrap_or_else(|| {
                    panic!(
                        "{origin}: {} is in no volume of container {}",
                        file.display(),
                        c.name
                    )
                });
            assert_eq!(mount.read_only, Some(true), "{origin}: {}", mount.name);
            assert!(
                mount.sub_path.is_none(),
                "{origin}: no subPath, so updates arrive"
            );
            let volume = pod
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == mount.name)
                .unwrap();
            let cm = volume
                .config_map
                .as_ref()
                .unwrap_or_else(|| panic!("{origin}: volume {} is not a ConfigMap", volume.name));
            assert_eq!(cm.name, config_map, "{origin}: the Bundle's ConfigMap");
            assert_ne!(cm.optional, Some(true), "{origin}: the agent needs the CA");
            let name = file.file_name().unwrap().to_str().unwrap();
            let source_key = match &cm.items {
                Some(items) if !items.is_empty() => items
                    .iter()
                    .find(|i| i.path == name)
                    .unwrap_or_else(|| panic!("{origin}: no item for {name}"))
                    .key
                    .as_str(),
                _ => name,
            };
            assert_eq!(source_key, key, "{origin}: {name} is the Bundle's key");
        }
    }
}

#[test]
fn the_interception_key_is_never_mounted_into_ai_workloads() {
    let Some(bin) = kustomize() else { return };
    let (gw, _) = render_overlay(&bin, &[""], &["components/interception"]);
    let (agent, _) = render_overlay(&bin, &["example-agent"], &["example-agent/interception"]);
    let secret = gw.certificates[0]["spec"]["secretName"].as_str().unwrap();
    assert_eq!(gw.certificates[0]["metadata"]["namespace"], GATEWAY_NS);

    let mut agent_pods = 0;
    for (origin, d) in gw.deployments.iter().chain(&agent.deployments) {
        if namespace_of(&d.metadata) != AGENTS_NS {
            continue;
        }
        agent_pods += 1;
        let pod = pod_spec(d);
        for v in pod.volumes.iter().flatten() {
            assert!(
                v.secret.is_none(),
                "{origin}: volume {} mounts a Secret into ai-workloads",
                v.name
            );
            for p in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
                assert!(
                    p.secret.is_none(),
                    "{origin}: projected volume {} mounts a Secret",
                    v.name
                );
            }
        }
        let containers = pod
            .containers
            .iter()
            .chain(pod.init_containers.iter().flatten());
        for c in containers {
            for e in c.env.iter().flatten() {
                let from = e
                    .value_from
                    .as_ref()
                    .and_then(|f| f.secret_key_ref.as_ref());
                assert!(
                    from.is_none_or(|r| r.name != secret),
                    "{origin}: {} reads the CA Secret in env {}",
                    c.name,
                    e.name
                );
            }
            for f in c.env_from.iter().flatten() {
                assert!(
                    f.secret_ref.as_ref().is_none_or(|r| r.name != secret),
                    "{origin}: {} reads the CA Secret through envFrom",
                    c.name
                );
            }
        }
    }
    assert!(agent_pods >= 1, "the example agent");
}

// === Every rendering keeps the invariants: kustomize with its components, Helm ===

/// The kustomize components an operator may opt in to, all at once.
const ALL_COMPONENTS: [&str; 3] = [
    "components/interception",
    "components/redis",
    "components/monitoring",
];

/// The Helm values that turn on what ALL_COMPONENTS adds to the base.
const HELM_ALL: [&str; 4] = [
    "interception.enabled=true",
    "redis.enabled=true",
    "serviceMonitor.enabled=true",
    "prometheusRule.enabled=true",
];

fn chart_dir() -> PathBuf {
    repo().join("deploy/helm/egress-gateway")
}

/// `helm lint --strict` and `helm template` of the chart with `--set` values, parsed,
/// typed and checked like the kustomize renderings.
fn helm_render(bin: &Path, sets: &[&str]) -> (Manifests, Vec<Value>) {
    let set_args: Vec<String> = sets.iter().map(|s| format!("--set={s}")).collect();
    let lint = std::process::Command::new(bin)
        .args(["lint", "--strict"])
        .arg(chart_dir())
        .args(&set_args)
        .output()
        .unwrap();
    assert!(
        lint.status.success(),
        "helm lint --strict {sets:?} failed:\n{}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
    let out = std::process::Command::new(bin)
        .args(["template", "egress-gateway"])
        .arg(chart_dir())
        .args(&set_args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm template {sets:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
        .unwrap_or_else(|e| panic!("helm template {sets:?}: not valid YAML: {e}\n{text}"));
    let docs: Vec<Value> = docs.into_iter().filter(|d| !d.is_null()).collect();
    let mut m = Manifests::default();
    for (i, doc) in docs.iter().enumerate() {
        m.add(doc, &format!("helm template {sets:?} (document {})", i + 1));
    }
    (m, docs)
}

/// The environment the rendered gateway container gets (literal values only; those
/// from Secrets are not known until the cluster).
struct PodEnv(BTreeMap<String, String>);
impl Env for PodEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

fn gateway_env(m: &Manifests) -> PodEnv {
    let (_, d) = gateway_deployment(m);
    PodEnv(
        gateway_container(d)
            .env
            .iter()
            .flatten()
            .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
            .collect(),
    )
}

/// What the rendered gateway runs with: its gateway.yaml, read by the gateway's own
/// loader with the container's environment, and its policy.yaml, compiled.
fn rendered_config_and_policy(m: &Manifests, what: &str) -> (GatewayConfig, Value) {
    let text = rendered_gateway_yaml(m);
    let cfg = GatewayConfig::from_yaml_str(
        &text,
        &format!("{what}: gateway.yaml"),
        &Overrides::default(),
        &gateway_env(m),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let dir = cfg.policy.parent().unwrap();
    let file = cfg.policy.file_name().unwrap().to_str().unwrap();
    let (_, d) = gateway_deployment(m);
    let c = gateway_container(d);
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|vm| Path::new(&vm.mount_path) == dir)
        .unwrap_or_else(|| panic!("{what}: nothing mounted at {}", dir.display()));
    let cm = pod_spec(d)
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .and_then(|v| v.config_map.as_ref())
        .unwrap_or_else(|| panic!("{what}: {} is not a ConfigMap volume", mount.name));
    let policy_text = rendered_config_map(m, &cm.name)
        .data
        .as_ref()
        .and_then(|d| d.get(file))
        .unwrap_or_else(|| panic!("{what}: ConfigMap {} has no {file}", cm.name))
        .clone();
    Policy::from_yaml_str(&policy_text, &format!("{what}: policy.yaml"))
        .unwrap_or_else(|e| panic!("policy check {what}: {e}"));
    (cfg, yaml_value(&policy_text, what))
}

/// Every invariant the shipped files promise, on one rendering as `kubectl apply`
/// would receive it.
fn check_rendering(m: &Manifests, what: &str) {
    let (cfg, policy) = rendered_config_and_policy(m, what);
    if !m.namespaces.is_empty() {
        check_pod_security(m);
    }
    for (origin, d) in &m.deployments {
        check_restricted(pod_spec(d), origin);
    }
    check_gateway_deployment(m, &cfg);
    check_probes(m, &cfg);
    check_gateway_mounts(m, &cfg, &policy);
    check_service_and_pdb(m);
    check_agent_network_policies(m);
    check_gateway_network_policies(m);
    check_cluster_spiffe_ids(m, &policy);
    check_limits_backend(m, &cfg);
    check_monitoring(m, &cfg);
}

/// With a Redis among the objects, every replica's limits backend is it, the gateway
/// may reach it and nothing else may; without, the backend is per replica (`memory`).
fn check_limits_backend(m: &Manifests, cfg: &GatewayConfig) {
    let redis = m
        .services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some("egress-gateway-redis"));
    let Some(redis) = redis else {
        assert_eq!(cfg.limits_backend, "memory", "no Redis rendered");
        return;
    };
    let ns = namespace_of(&redis.metadata);
    let spec = redis.spec.as_ref().unwrap();
    let port = spec
        .ports
        .iter()
        .flatten()
        .next()
        .expect("a Redis port")
        .port;
    assert_eq!(
        cfg.limits_backend,
        format!("redis://egress-gateway-redis.{ns}.svc:{port}/0"),
        "the gateway's limits backend is the rendered Redis Service"
    );
    // The Service selects the Redis pods, which are not the gateway's.
    let (origin, d) = m
        .deployments
        .iter()
        .find(|(_, d)| d.metadata.name.as_deref() == Some("egress-gateway-redis"))
        .expect("the Redis Deployment");
    let labels = pod_labels(d);
    let selector = spec.selector.clone().unwrap_or_default();
    assert!(
        !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
        "{origin}: the Service selects the Redis pods"
    );
    let (_, gw) = gateway_deployment(m);
    assert_ne!(
        labels.get("app.kubernetes.io/name"),
        pod_labels(gw).get("app.kubernetes.io/name"),
        "{origin}: Redis pods must not look like the gateway's (ClusterSPIFFEID, Service)"
    );
    let container = &pod_spec(d).containers[0];
    let target = spec
        .ports
        .iter()
        .flatten()
        .next()
        .unwrap()
        .target_port
        .clone();
    assert_eq!(
        container_port(container, &target.unwrap_or(IntOrString::Int(port))),
        6379
    );
    // The gateway's egress reaches the Redis pods on that port (the ingress side is
    // check_gateway_network_policies: only the gateway gets in).
    let gateway_labels = pod_labels(gw);
    let reaches = policies_in(m, GATEWAY_NS).iter().any(|p| {
        let spec = p.spec.as_ref().unwrap();
        spec.pod_selector
            .as_ref()
            .is_some_and(|s| labels_match(s, &gateway_labels))
            && spec.egress.iter().flatten().any(|r| {
                rule_ports(r.ports.as_ref())
                    .is_some_and(|ports| ports.contains(&("TCP".to_string(), 6379)))
                    && r.to.iter().flatten().any(|peer| {
                        peer.namespace_selector
                            .as_ref()
                            .is_some_and(|s| selects_namespace(s, ns))
                            && peer
                                .pod_selector
                                .as_ref()
                                .is_some_and(|s| labels_match(s, &labels))
                    })
            })
    });
    assert!(reaches, "no NetworkPolicy lets the gateway reach Redis");
    let admitted = policies_in(m, GATEWAY_NS).iter().any(|p| {
        let spec = p.spec.as_ref().unwrap();
        spec.pod_selector
            .as_ref()
            .is_some_and(|s| !is_empty_selector(s) && labels_match(s, &labels))
            && spec.ingress.iter().flatten().any(|r| {
                rule_ports(r.ports.as_ref())
                    .is_some_and(|ports| ports.contains(&("TCP".to_string(), 6379)))
            })
    });
    assert!(admitted, "no NetworkPolicy lets the gateway into Redis");
}

fn is_empty_selector(s: &LabelSelector) -> bool {
    s.match_labels.as_ref().is_none_or(BTreeMap::is_empty)
        && s.match_expressions.as_ref().is_none_or(Vec::is_empty)
}

/// A ServiceMonitor scrapes the gateway's admin port at /metrics through its Service
/// (from a namespace its NetworkPolicy admits); a PrometheusRule sits beside it.
fn check_monitoring(m: &Manifests, cfg: &GatewayConfig) {
    assert_eq!(
        m.service_monitors.len(),
        m.prometheus_rules.len(),
        "scraping and alerting come together"
    );
    for sm in &m.service_monitors {
        let name = sm["metadata"]["name"].as_str().unwrap_or_default();
        assert_eq!(
            sm["metadata"]["namespace"], GATEWAY_NS,
            "ServiceMonitor {name}"
        );
        let selector: LabelSelector =
            serde_json::from_value(sm["spec"]["selector"].clone()).unwrap();
        let selected: Vec<&Service> = m
            .services
            .iter()
            .filter(|s| namespace_of(&s.metadata) == GATEWAY_NS)
            .filter(|s| labels_match(&selector, &s.metadata.labels.clone().unwrap_or_default()))
            .collect();
        assert_eq!(
            selected.len(),
            1,
            "ServiceMonitor {name} selects exactly the gateway's Service"
        );
        assert_eq!(selected[0].metadata.name.as_deref(), Some("egress-gateway"));
        let svc_ports = selected[0]
            .spec
            .as_ref()
            .unwrap()
            .ports
            .clone()
            .unwrap_or_default();
        let (_, d) = gateway_deployment(m);
        let c = gateway_container(d);
        for e in sm["spec"]["endpoints"].as_array().unwrap() {
            assert_eq!(e["path"], "/metrics", "ServiceMonitor {name}");
            let port = svc_ports
                .iter()
                .find(|p| Some(p.name.as_deref().unwrap_or_default()) == e["port"].as_str())
                .unwrap_or_else(|| panic!("ServiceMonitor {name}: no Service port {}", e["port"]));
            assert_eq!(
                container_port(c, port.target_port.as_ref().unwrap()),
                i32::from(cfg.admin.port()),
                "ServiceMonitor {name}: scrapes the admin listener"
            );
        }
    }
    // Prometheus may reach the admin port (check_gateway_network_policies keeps it
    // away from 8443).
    if !m.service_monitors.is_empty() {
        let (_, d) = gateway_deployment(m);
        let gateway_labels = pod_labels(d);
        let admitted = policies_in(m, GATEWAY_NS).iter().any(|p| {
            let spec = p.spec.as_ref().unwrap();
            spec.pod_selector
                .as_ref()
                .is_some_and(|s| labels_match(s, &gateway_labels))
                && spec.ingress.iter().flatten().any(|r| {
                    rule_ports(r.ports.as_ref()).is_some_and(|ports| {
                        ports.contains(&("TCP".to_string(), i32::from(cfg.admin.port())))
                    })
                })
        });
        assert!(admitted, "no NetworkPolicy admits the scrapes");
    }
}

/// The objects of a rendering keyed by kind, namespace and name, as the cluster would
/// compare them: Helm's bookkeeping labels dropped, the content hash in the config
/// ConfigMap's name masked, YAML files inside ConfigMaps parsed (comments and key
/// order are not the object).
fn comparable(docs: &[Value]) -> BTreeMap<String, Value> {
    fn mask_config_name(v: &mut Value) {
        if let Some(name) = v.as_str() {
            if name.starts_with("egress-gateway-config-") {
                *v = Value::String("egress-gateway-config-<hash>".into());
            }
        }
    }
    let mut out = BTreeMap::new();
    for doc in docs {
        let mut doc = doc.clone();
        if let Some(labels) = doc["metadata"]
            .get_mut("labels")
            .and_then(Value::as_object_mut)
        {
            labels.remove("helm.sh/chart");
            labels.remove("app.kubernetes.io/managed-by");
            if labels.is_empty() {
                doc["metadata"].as_object_mut().unwrap().remove("labels");
            }
        }
        if doc["kind"] == "ConfigMap" {
            mask_config_name(&mut doc["metadata"]["name"]);
            if let Some(data) = doc.get_mut("data").and_then(Value::as_object_mut) {
                for (key, v) in data.iter_mut() {
                    if key.ends_with(".yaml") {
                        let text = v.as_str().unwrap_or_default().to_string();
                        *v = yaml_value(&text, key);
                    }
                }
            }
        }
        if doc["kind"] == "Deployment" {
            let volumes = &mut doc["spec"]["template"]["spec"]["volumes"];
            for v in volumes.as_array_mut().into_iter().flatten() {
                if let Some(cm) = v.get_mut("configMap") {
                    mask_config_name(&mut cm["name"]);
                }
            }
        }
        let key = format!(
            "{} {}/{}",
            doc["kind"].as_str().unwrap_or_default(),
            doc["metadata"]["namespace"].as_str().unwrap_or("-"),
            doc["metadata"]["name"].as_str().unwrap_or_default()
        );
        assert!(out.insert(key.clone(), doc).is_none(), "{key} twice");
    }
    out
}

/// Where two JSON values first differ, as a path.
fn first_difference(a: &Value, b: &Value, at: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| match (x.get(k), y.get(k)) {
                (Some(xv), Some(yv)) => first_difference(xv, yv, &format!("{at}.{k}")),
                (xv, yv) => Some(format!("{at}.{k}: {xv:?} vs {yv:?}")),
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (xv, yv))| first_difference(xv, yv, &format!("{at}[{i}]"))),
        _ if a == b => None,
        _ => Some(format!("{at}: {a} vs {b}")),
    }
}

/// The two renderings hold the same objects with the same content.
fn assert_same_objects(kustomize: &[Value], helm: &[Value], what: &str) {
    let k = comparable(kustomize);
    let h = comparable(helm);
    let only_k: Vec<&String> = k.keys().filter(|key| !h.contains_key(*key)).collect();
    let only_h: Vec<&String> = h.keys().filter(|key| !k.contains_key(*key)).collect();
    assert!(
        only_k.is_empty() && only_h.is_empty(),
        "{what}: objects only kustomize renders: {only_k:?}; only Helm: {only_h:?}"
    );
    for (key, kv) in &k {
        if let Some(diff) = first_difference(kv, &h[key], "") {
            panic!("{what}: {key} differs (kustomize vs Helm) at {diff}");
        }
    }
}

#[test]
fn kustomize_renderings_with_every_component_keep_the_invariants() {
    let Some(bin) = kustomize() else { return };
    let (base, _) = render_overlay(&bin, &[""], &[]);
    check_rendering(&base, "kustomize base");
    let (all, _) = render_overlay(&bin, &[""], &ALL_COMPONENTS);
    check_rendering(&all, "kustomize base + every component");
    check_gateway_interception(&all, "egress-gateway-interception-ca");
    assert_eq!(all.service_monitors.len(), 1);
    let (byo, _) = render_overlay(&bin, &[""], &["components/interception-ca-secret"]);
    check_rendering(&byo, "kustomize base + your own CA");
}

#[test]
fn helm_chart_renders_the_objects_of_the_kustomize_base() {
    let (Some(helm), Some(kustomize)) = (helm(), kustomize()) else {
        return;
    };
    let (m, docs) = helm_render(&helm, &[]);
    check_rendering(&m, "helm template (default values)");
    let (_, base) = render_overlay(&kustomize, &[""], &[]);
    assert_same_objects(&base, &docs, "default values vs the kustomize base");
}

#[test]
fn helm_chart_values_render_the_objects_of_the_kustomize_components() {
    let (Some(helm), Some(kustomize)) = (helm(), kustomize()) else {
        return;
    };
    let (m, docs) = helm_render(&helm, &HELM_ALL);
    check_rendering(&m, "helm template (every option)");
    check_gateway_interception(&m, "egress-gateway-interception-ca");
    let (_, all) = render_overlay(&kustomize, &[""], &ALL_COMPONENTS);
    assert_same_objects(&all, &docs, "every option vs base + every component");

    // Your own interception CA: the gateway's side alone, as the -ca-secret component.
    let (m, docs) = helm_render(
        &helm,
        &[
            "interception.enabled=true",
            "interception.certManager=false",
        ],
    );
    check_rendering(&m, "helm template (your own CA)");
    assert!(m.certificates.is_empty() && m.bundles.is_empty() && m.issuers.is_empty());
    let (_, byo) = render_overlay(&kustomize, &[""], &["components/interception-ca-secret"]);
    assert_same_objects(&byo, &docs, "your own CA vs base + interception-ca-secret");
}

#[test]
fn helm_values_reach_the_objects() {
    let Some(helm) = helm() else { return };
    let (m, _) = helm_render(
        &helm,
        &[
            "image.repository=registry.example/egress-gateway",
            "image.tag=1.2.3",
            "replicas=3",
            "autoscaling.minReplicas=3",
            "priorityClassName=egress-gateway-critical",
            "namespaces.create=false",
            "redis.urlSecret.name=limits-redis",
            "redis.urlSecret.key=url",
            "secrets[0].name=openai-api-key",
            "secrets[0].mountPath=/var/run/secrets/openai",
            "secrets[0].stringData.token=sk-test",
            "config.shutdown_grace=20s",
            "autoscaling.enabled=false",
            "networkPolicy.agentDnsLabel.example/dns=yes",
        ],
    );
    let (cfg, _) = rendered_config_and_policy(&m, "helm template (values)");
    assert_eq!(cfg.shutdown_grace, std::time::Duration::from_secs(20));
    let (_, d) = gateway_deployment(&m);
    let c = gateway_container(d);
    assert_eq!(
        c.image.as_deref(),
        Some("registry.example/egress-gateway:1.2.3")
    );
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(3));
    assert_eq!(
        pod_spec(d).priority_class_name.as_deref(),
        Some("egress-gateway-critical")
    );
    assert!(m.namespaces.is_empty(), "namespaces.create=false");
    assert!(m.hpas.is_empty(), "autoscaling.enabled=false");
    // A Redis URL with its password stays in a Secret: the variable refers to it.
    let from_secret = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "EGRESS_LIMITS_BACKEND")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|f| f.secret_key_ref.as_ref())
        .expect("EGRESS_LIMITS_BACKEND from the Secret");
    assert_eq!(
        (from_secret.name.as_str(), from_secret.key.as_str()),
        ("limits-redis", "url")
    );
    // secrets[].stringData creates the Secret the pod mounts.
    assert_eq!(m.secrets.len(), 1);
    assert_eq!(namespace_of(&m.secrets[0].metadata), GATEWAY_NS);
    let dns = policies_in(&m, AGENTS_NS)
        .into_iter()
        .find(|p| p.metadata.name.as_deref() == Some("allow-dns-for-labelled-agents"))
        .unwrap();
    let labels = dns
        .spec
        .unwrap()
        .pod_selector
        .unwrap()
        .match_labels
        .unwrap();
    assert_eq!(labels.get("example/dns").map(String::as_str), Some("yes"));
    check_gateway_deployment_without_hpa(&m, &cfg);

    // values.schema.json: a misspelt value fails the render instead of being ignored.
    let out = std::process::Command::new(&helm)
        .args(["template", "egress-gateway"])
        .arg(chart_dir())
        .arg("--set=replcas=3")
        .output()
        .unwrap();
    assert!(!out.status.success(), "a misspelt value rendered");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("replcas"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// check_gateway_deployment's parts that do not need an HPA.
fn check_gateway_deployment_without_hpa(m: &Manifests, cfg: &GatewayConfig) {
    check_probes(m, cfg);
    for (origin, d) in &m.deployments {
        check_restricted(pod_spec(d), origin);
    }
}

/// The PrometheusRule's groups as a Prometheus rule file, next to a copy of its unit
/// tests: `promtool check rules`, then `promtool test rules`.
#[test]
fn the_alerts_pass_promtool_and_their_unit_tests() {
    let Some(promtool) = promtool() else { return };
    let dir = k8s_dir().join("components/monitoring");
    let rule = yaml_docs(&dir.join("prometheusrule.yaml")).remove(0);
    let work = tempfile::tempdir().unwrap();
    std::fs::write(
        work.path().join("rules.yaml"),
        serde_json::to_string_pretty(&rule["spec"]).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        dir.join("prometheusrule.tests.yaml"),
        work.path().join("tests.yaml"),
    )
    .unwrap();
    for args in [
        ["check", "rules", "rules.yaml"],
        ["test", "rules", "tests.yaml"],
    ] {
        let out = std::process::Command::new(&promtool)
            .args(args)
            .current_dir(work.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every alert has a unit test.
    let tests = std::fs::read_to_string(dir.join("prometheusrule.tests.yaml")).unwrap();
    for group in rule["spec"]["groups"].as_array().unwrap() {
        for r in group["rules"].as_array().unwrap() {
            let alert = r["alert"].as_str().unwrap();
            assert!(
                tests.contains(&format!("alertname: {alert}")),
                "{alert} has no test in prometheusrule.tests.yaml"
            );
        }
    }
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

/// A service's environment, mapping or `KEY=VALUE` list syntax.
fn compose_env(svc: &Value) -> BTreeMap<String, String> {
    match &svc["environment"] {
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), v)
            })
            .collect(),
        Value::Array(a) => a
            .iter()
            .filter_map(|e| {
                let (k, v) = e.as_str()?.split_once('=')?;
                Some((k.to_string(), v.to_string()))
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// `depends_on: {dep: {condition: ...}}` of a service; the short list form has none.
fn compose_condition<'a>(svc: &'a Value, dep: &str) -> Option<&'a str> {
    svc["depends_on"][dep]["condition"].as_str()
}

#[test]
fn compose_interception_ca_reaches_the_gateway_and_only_its_certificate_the_agents() {
    let c = compose();
    let all = services(&c);
    let init = &all["interception-ca"];
    assert_eq!(init["network_mode"], "none", "the CA is made offline");
    let init_mounts: BTreeMap<String, String> = volume_mounts(init).into_iter().collect();
    let script_path = init_mounts
        .iter()
        .find(|(src, _)| src.ends_with(".sh"))
        .map(|(src, _)| repo().join(src.trim_start_matches("./")))
        .expect("interception-ca runs a script from the repository");
    let script = std::fs::read_to_string(&script_path).unwrap();
    let ca_dir = init_mounts.get("interception-ca").expect("the CA volume");
    let trust_dir = init_mounts
        .get("interception-trust")
        .expect("the trust volume");

    // The gateway mounts the CA volume, read-only, and its config names those files.
    let gateway = &all["gateway"];
    let gw_dir = gateway["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .find_map(|v| {
            let mut parts = v.split(':');
            (parts.next() == Some("interception-ca")).then(|| {
                let dst = parts.next().unwrap().to_string();
                assert_eq!(
                    parts.next(),
                    Some("ro"),
                    "gateway: the CA volume is read-only"
                );
                dst
            })
        })
        .expect("the gateway mounts the interception-ca volume");
    assert_eq!(
        compose_condition(gateway, "interception-ca"),
        Some("service_completed_successfully"),
        "the gateway starts once the CA exists"
    );
    let path = repo().join("deploy/compose/gateway/gateway.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let cfg = GatewayConfig::from_yaml_str(&text, &rel(&path), &Overrides::default(), &NoEnv)
        .unwrap_or_else(|e| panic!("{e}"));
    let interception = cfg.interception.expect("the demo gateway intercepts");
    for (file, what) in [
        (&interception.ca_cert, "ca_cert"),
        (&interception.ca_key, "ca_key"),
    ] {
        assert_eq!(
            file.parent(),
            Some(Path::new(&gw_dir)),
            "interception.{what} {} is not in the mounted CA volume {gw_dir}",
            file.display()
        );
        let name = file.file_name().unwrap().to_str().unwrap();
        assert!(
            script.contains(&format!("{ca_dir}/{name}")),
            "{} does not write {ca_dir}/{name}",
            rel(&script_path)
        );
    }

    // Only the gateway (and the service that makes it) ever mounts the key's volume.
    for (name, svc) in all {
        if name != "gateway" && name != "interception-ca" {
            assert!(
                volume_mounts(svc)
                    .iter()
                    .all(|(src, _)| src != "interception-ca"),
                "service {name} mounts the interception CA's key"
            );
        }
    }

    // Both agents trust it through the same four variables, pointing at one file of
    // the trust volume, which the script writes.
    for name in ["research-agent", "coding-agent"] {
        let svc = &all[name];
        let env = compose_env(svc);
        let files: BTreeSet<&str> = INTERCEPTION_TRUST_VARS
            .iter()
            .map(|var| {
                env.get(*var)
                    .unwrap_or_else(|| panic!("service {name}: no {var}"))
                    .as_str()
            })
            .collect();
        assert_eq!(files.len(), 1, "service {name}: one trust file: {files:?}");
        let file = Path::new(files.first().unwrap());
        let mount = svc["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .find(|v| v.starts_with("interception-trust:"))
            .unwrap_or_else(|| panic!("service {name} does not mount interception-trust"));
        let mut parts = mount.split(':').skip(1);
        let dir = parts.next().unwrap();
        assert_eq!(parts.next(), Some("ro"), "service {name}: read-only");
        assert_eq!(
            file.parent(),
            Some(Path::new(dir)),
            "service {name}: {}",
            file.display()
        );
        let base = file.file_name().unwrap().to_str().unwrap();
        assert!(
            script.contains(&format!("{trust_dir}/{base}")),
            "{} does not write {trust_dir}/{base}",
            rel(&script_path)
        );
        assert_eq!(
            compose_condition(svc, "interception-ca"),
            Some("service_completed_successfully"),
            "service {name} starts once its trust file exists"
        );
    }
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
