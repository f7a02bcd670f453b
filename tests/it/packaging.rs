//! The ways to run fleetpick that the tests cannot start here (no Docker engine, no cluster):
//! the Dockerfile, `envoy/docker-compose.yml` with its fleet file and Envoy config, and the
//! Kubernetes manifests, checked as YAML and against each other and the code.

use std::net::SocketAddr;

use fleetpick_config::FleetConfig;
use fleetpick_envoy::compose;
use serde_json::Value;

fn repo(path: &str) -> String {
    let p = fleetpick_tests::repo(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

fn yaml(text: &str) -> Value {
    serde_norway::from_str(text).unwrap()
}

fn yaml_documents(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect()
}

#[test]
fn the_compose_file_its_fleet_file_and_its_envoy_agree() {
    let c = yaml(&repo("envoy/docker-compose.yml"));
    let services = &c["services"];
    for name in ["sim", "fleetpick", "envoy"] {
        assert!(services[name].is_object(), "service {name}");
    }
    assert_eq!(
        c["networks"]["fleet"]["ipam"]["config"][0]["subnet"],
        compose::SUBNET
    );
    let ip = |s: &str| {
        services[s]["networks"]["fleet"]["ipv4_address"]
            .as_str()
            .unwrap()
    };
    assert_eq!(ip("sim"), compose::SIM.to_string());
    assert_eq!(ip("fleetpick"), compose::FLEETPICK.to_string());
    assert_eq!(ip("envoy"), compose::ENVOY.to_string());
    // The simulator from the lab's image, fleetpick from the shipped one.
    assert_eq!(services["sim"]["build"]["dockerfile"], "Dockerfile.lab");
    assert_eq!(services["fleetpick"]["build"]["dockerfile"], "Dockerfile");
    // Each mounted file exists beside the compose file.
    for (service, file) in [
        ("fleetpick", "compose-fleet.yaml"),
        ("envoy", "compose-envoy.yaml"),
    ] {
        let volumes = strings(&services[service]["volumes"]);
        assert!(
            volumes.iter().any(|v| v.starts_with(&format!("./{file}:"))),
            "{service} mounts {file}: {volumes:?}"
        );
        repo(&format!("envoy/{file}"));
    }
    // The simulator serves the ports the fleet file and Envoy name.
    let sim = strings(&services["sim"]["command"]);
    let ports_arg = sim[sim.iter().position(|a| *a == "--ports").unwrap() + 1];
    let ports: Vec<u16> = ports_arg.split(',').map(|p| p.parse().unwrap()).collect();
    assert_eq!(ports, compose::SIM_PORTS);
    assert!(sim.windows(2).any(|w| w == ["--listen", "0.0.0.0"]));
    let cfg = FleetConfig::parse(
        &repo("envoy/compose-fleet.yaml"),
        "envoy/compose-fleet.yaml",
    )
    .unwrap();
    let served: Vec<SocketAddr> = cfg.endpoints.iter().map(|e| e.addr).collect();
    assert_eq!(served, compose::params().endpoints);
    assert_eq!(
        cfg.file.server.listen.port(),
        compose::params().extproc.port()
    );
    assert_eq!(cfg.file.clusters.len(), 2, "two clusters");
    // fleetpick's health check asks its own readiness, on its metrics port.
    let check = strings(&services["fleetpick"]["healthcheck"]["test"]);
    let metrics = cfg.file.server.metrics_listen.unwrap();
    assert_eq!(
        check,
        [
            "CMD",
            "fleetpick",
            "probe",
            &format!("http://127.0.0.1:{}/readyz", metrics.port())
        ]
    );
    assert_eq!(
        services["envoy"]["depends_on"]["fleetpick"]["condition"],
        "service_healthy"
    );
    assert_eq!(
        strings(&services["fleetpick"]["command"]),
        ["serve", "--config", "/etc/fleetpick/fleet.yaml"]
    );
}

#[test]
fn the_dockerfile_builds_in_one_stage_and_runs_unprivileged_in_another() {
    let d = repo("Dockerfile");
    let froms = d.lines().filter(|l| l.starts_with("FROM ")).count();
    assert_eq!(froms, 2, "multi-stage");
    let user = d
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert!(
        !user.starts_with("root") && !user.starts_with("0"),
        "{user}"
    );
    // The shipped crate only, its symbols kept (debug info stripped, not the symbol table).
    assert!(d.contains("cargo build --release --locked -p fleetpick --bin fleetpick"));
    assert!(d.contains("strip --strip-debug") && !d.contains("strip target"));
    assert!(d.contains("ENTRYPOINT [\"fleetpick\"]"));
    // The simulator has its own image, of the lab's crate.
    let lab = repo("Dockerfile.lab");
    assert!(lab.contains("-p fleetpick-lab"));
    assert!(lab.contains("ENTRYPOINT [\"fleetpick-lab\"]"));
    let ignore = repo(".dockerignore");
    assert!(
        ignore.lines().any(|l| l == "target"),
        "the build context skips target/"
    );
}

/// The one document of `kind` among a manifest's.
fn of_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("a {kind}"))
}

/// A manifest's ConfigMap and the fleet file in it, validated.
fn fleet_config_map(docs: &[Value]) -> (&Value, FleetConfig) {
    let cm = of_kind(docs, "ConfigMap");
    let cfg = FleetConfig::parse(cm["data"]["fleet.yaml"].as_str().unwrap(), "configmap").unwrap();
    (cm, cfg)
}

#[test]
fn the_kubernetes_manifests_agree_with_each_other_and_the_fleet_file() {
    let docs = yaml_documents(&repo("examples/k8s/fleetpick.yaml"));
    let find = |kind: &str| of_kind(&docs, kind);
    let (cm, cfg) = fleet_config_map(&docs);
    let dep = find("Deployment");
    let svc = find("Service");
    let pool = find("InferencePool");
    find("ServiceAccount");
    find("Role");
    find("RoleBinding");
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0];
    // The ConfigMap is mounted where the arguments look for the fleet file.
    let args = strings(&container["args"]);
    let mount = container["volumeMounts"][0]["mountPath"].as_str().unwrap();
    assert_eq!(args, ["serve", "--config", &format!("{mount}/fleet.yaml")]);
    assert_eq!(
        pod["volumes"][0]["configMap"]["name"],
        cm["metadata"]["name"]
    );
    // Ports: the fleet file's listeners, the container's, the Service's, the pool's picker.
    let port_of = |name: &str| {
        container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()["containerPort"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(port_of("grpc"), u64::from(cfg.file.server.listen.port()));
    assert_eq!(
        port_of("metrics"),
        u64::from(cfg.file.server.metrics_listen.unwrap().port())
    );
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace * 1000 > cfg.file.server.shutdown_grace_ms,
        "Kubernetes waits longer than fleetpick drains"
    );
    let picker = &pool["spec"]["endpointPickerRef"];
    assert_eq!(picker["name"], svc["metadata"]["name"]);
    let grpc = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "grpc")
        .unwrap();
    assert_eq!(picker["port"]["number"], grpc["port"]);
    assert_eq!(grpc["appProtocol"], "kubernetes.io/h2c");
    assert_eq!(
        svc["spec"]["selector"],
        dep["spec"]["template"]["metadata"]["labels"]
    );
    // The InferencePool is one fleetpick reads too, for the pool of the fleet file.
    assert_eq!(pool["metadata"]["name"], cfg.file.pools[0].name.as_str());
    assert_eq!(
        pool["spec"]["targetPorts"][0]["number"],
        u64::from(cfg.file.pools[0].target_port.unwrap())
    );
}

#[test]
fn the_sidecar_manifest_puts_fleetpick_where_the_shipped_envoy_looks() {
    let docs = yaml_documents(&repo("examples/k8s/envoy-sidecar.yaml"));
    let find = |kind: &str| of_kind(&docs, kind);
    let (cm, cfg) = fleet_config_map(&docs);
    // envoy/envoy.yaml, which the manifest mounts, reaches fleetpick at its user default.
    let envoy_yaml = yaml(&repo("envoy/envoy.yaml"));
    let picker = envoy_yaml["static_resources"]["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "fleetpick")
        .unwrap();
    let addr = &picker["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        ["socket_address"];
    assert_eq!(
        format!(
            "{}:{}",
            addr["address"].as_str().unwrap(),
            addr["port_value"]
        ),
        cfg.file.server.listen.to_string()
    );
    assert!(
        cfg.file.server.listen.ip().is_loopback(),
        "only the Pod reaches it"
    );
    let dep = find("Deployment");
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let containers = pod["containers"].as_array().unwrap();
    let named = |n: &str| containers.iter().find(|c| c["name"] == n).unwrap();
    let (envoy, fleetpick) = (named("envoy"), named("fleetpick"));
    // Each container's configuration is mounted where its arguments look.
    let mount = |c: &Value| {
        c["volumeMounts"][0]["mountPath"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        strings(&fleetpick["args"]),
        [
            "serve",
            "--config",
            &format!("{}/fleet.yaml", mount(fleetpick))
        ]
    );
    assert_eq!(
        strings(&envoy["args"])[..2],
        ["-c".to_string(), format!("{}/envoy.yaml", mount(envoy))]
    );
    let volume = |name: &str| {
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap()["configMap"]["name"]
            .clone()
    };
    assert_eq!(volume("fleet"), cm["metadata"]["name"]);
    assert_eq!(volume("envoy"), "envoy");
    // The client-facing port is Envoy's listener; fleetpick's health is on its metrics port.
    let listen =
        envoy_yaml["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
            .as_u64()
            .unwrap();
    assert_eq!(envoy["ports"][0]["containerPort"].as_u64().unwrap(), listen);
    assert_eq!(
        fleetpick["ports"][0]["containerPort"].as_u64().unwrap(),
        u64::from(cfg.file.server.metrics_listen.unwrap().port())
    );
    assert_eq!(fleetpick["readinessProbe"]["httpGet"]["path"], "/readyz");
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(grace * 1000 > cfg.file.server.shutdown_grace_ms);
    let svc = find("Service");
    assert_eq!(
        svc["spec"]["selector"],
        dep["spec"]["template"]["metadata"]["labels"]
    );
}
