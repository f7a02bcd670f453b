//! Kubernetes manifests the fleet file can name, so that users keep one source of truth:
//! `InferencePool` (`inference.networking.k8s.io/v1`, and the older
//! `inference.networking.x-k8s.io/v1alpha2`) gives a pool its target ports and says whether it
//! is exported to the cluster set; `InferenceObjective` (`inference.networking.x-k8s.io`) gives
//! a named objective its priority and pool.
//!
//! A manifest file may hold many YAML documents (`---`); objects of other kinds (Deployments,
//! Services, ...) are skipped, so a directory's worth of manifests can be named as it is.

use std::path::Path;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::position::{FieldPath, Tree};

/// The annotation that exports an InferencePool to the cluster set.
pub const EXPORT_ANNOTATION: &str = "inference.networking.x-k8s.io/export";

/// An InferencePool, as fleetpick uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolManifest {
    pub name: String,
    pub namespace: Option<String>,
    /// Every port of every pod is an endpoint.
    pub target_ports: Vec<u16>,
    /// Annotated for export (`ClusterSet`).
    pub exported: bool,
    /// `spec.endpointPickerRef.failureMode`: `FailOpen` or `FailClose` (the default).
    pub fail_open: bool,
    /// The file it came from, for messages.
    pub source: String,
    /// Where its document starts in that file.
    pub line: Option<usize>,
}

/// An InferenceObjective: requests naming it (the `x-gateway-inference-objective` header) get
/// its priority.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectiveManifest {
    pub name: String,
    pub priority: i32,
    pub pool: String,
    /// The file it came from (or "the fleet file"), for messages.
    pub source: String,
    /// Where its document starts in that file.
    pub line: Option<usize>,
}

/// `file:line` of an object of a manifest file, or the file alone, for messages.
fn origin(source: &str, line: Option<usize>) -> String {
    match line {
        Some(l) => format!("{source}:{l}"),
        None => source.to_string(),
    }
}

impl PoolManifest {
    /// Where it is, for messages: `file:line`.
    pub fn origin(&self) -> String {
        origin(&self.source, self.line)
    }
}

impl ObjectiveManifest {
    /// Where it is, for messages: `file:line`, or "the fleet file".
    pub fn origin(&self) -> String {
        origin(&self.source, self.line)
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Manifests {
    pub pools: Vec<PoolManifest>,
    pub objectives: Vec<ObjectiveManifest>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// A document that cannot be read, or an object fleetpick cannot use: the file, the
    /// document (from 1), the line where the file has the field at fault (serde's own messages
    /// name their line and column themselves), and why.
    #[error("manifest file {path}, document {doc}{}: {message}", line.map(|l| format!(", line {l}")).unwrap_or_default())]
    Invalid {
        path: String,
        doc: usize,
        line: Option<usize>,
        message: String,
    },
}

#[derive(Debug, Deserialize)]
struct Object {
    #[serde(rename = "apiVersion", default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: Metadata,
    #[serde(default)]
    spec: serde_norway::Value,
}

#[derive(Debug, Default, Deserialize)]
struct Metadata {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PoolSpecV1 {
    #[serde(default)]
    target_ports: Vec<PortRef>,
    /// v1alpha2's single port.
    #[serde(default)]
    target_port_number: Option<u16>,
    #[serde(default)]
    endpoint_picker_ref: Option<PickerRef>,
    /// v1alpha2's name for the picker reference.
    #[serde(default)]
    extension_ref: Option<PickerRef>,
}

#[derive(Debug, Deserialize)]
struct PortRef {
    number: u16,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PickerRef {
    #[serde(default)]
    failure_mode: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectiveSpec {
    #[serde(default)]
    priority: Option<i32>,
    pool_ref: NameRef,
}

#[derive(Debug, Deserialize)]
struct NameRef {
    name: String,
}

fn is_inference_group(api_version: &str) -> bool {
    api_version.starts_with("inference.networking.k8s.io/")
        || api_version.starts_with("inference.networking.x-k8s.io/")
}

/// Reads the InferencePools and InferenceObjectives of `text` (from `source`).
pub fn parse(text: &str, source: &str) -> Result<Manifests, ManifestError> {
    let mut out = Manifests::default();
    // Positions for the objects and for errors; the data is serde's.
    let tree = Tree::parse(text);
    for (doc, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let d = Document {
            text,
            source,
            tree: &tree,
            doc,
        };
        let value = serde_norway::Value::deserialize(de).map_err(|e| d.invalid(e, &[]))?;
        if value.is_null() {
            continue;
        }
        let obj: Object = serde_norway::from_value(value)
            .map_err(|e| d.invalid(located::<Object>(text, doc, e), &[]))?;
        if !is_inference_group(&obj.api_version) {
            continue;
        }
        match obj.kind.as_str() {
            "InferencePool" => out.pools.push(d.pool(obj)?),
            "InferenceObjective" => out.objectives.push(d.objective(obj)?),
            _ => {}
        }
    }
    Ok(out)
}

/// One document of a manifest file, for its objects and their errors.
struct Document<'a> {
    text: &'a str,
    source: &'a str,
    tree: &'a Tree<'a>,
    /// From 0.
    doc: usize,
}

impl Document<'_> {
    /// An error in this document, at the field `at` (its line, when the file has it).
    fn invalid(&self, message: impl ToString, at: &[&str]) -> ManifestError {
        let path = at.iter().fold(FieldPath::default(), |p, k| p.key(k));
        ManifestError::Invalid {
            path: self.source.to_string(),
            doc: self.doc + 1,
            line: self.tree.locate(self.doc, &path).map(|p| p.line),
            message: message.to_string(),
        }
    }

    /// An object's `spec` as `T` (its `kind` and name for messages).
    fn spec<T: DeserializeOwned>(
        &self,
        spec: serde_norway::Value,
        kind: &str,
        name: &str,
    ) -> Result<T, ManifestError> {
        serde_norway::from_value(spec).map_err(|e| {
            let e = located::<Spec<T>>(self.text, self.doc, e);
            self.invalid(format!("{kind} `{name}`: {e}"), &[])
        })
    }

    /// Where the document starts.
    fn line(&self) -> Option<usize> {
        self.tree.document_start(self.doc).map(|p| p.line)
    }

    fn pool(&self, obj: Object) -> Result<PoolManifest, ManifestError> {
        let name = obj.metadata.name.clone();
        if name.is_empty() {
            return Err(self.invalid("InferencePool without metadata.name", &["metadata"]));
        }
        let spec: PoolSpecV1 = self.spec(obj.spec, &obj.kind, &name)?;
        let mut ports: Vec<u16> = spec.target_ports.iter().map(|p| p.number).collect();
        ports.extend(spec.target_port_number);
        if ports.is_empty() || ports.contains(&0) || ports.len() > 8 {
            let field = match spec.target_port_number {
                Some(_) => "targetPortNumber",
                None => "targetPorts",
            };
            return Err(self.invalid(
                format!(
                    "InferencePool `{name}`: spec.targetPorts must list 1 to 8 ports, 1 to 65535"
                ),
                &["spec", field],
            ));
        }
        let picker = spec.endpoint_picker_ref.or(spec.extension_ref);
        Ok(PoolManifest {
            name,
            namespace: obj.metadata.namespace,
            target_ports: ports,
            exported: obj
                .metadata
                .annotations
                .get(EXPORT_ANNOTATION)
                .is_some_and(|v| v == "ClusterSet"),
            fail_open: picker
                .and_then(|p| p.failure_mode)
                .is_some_and(|m| m == "FailOpen"),
            source: self.source.to_string(),
            line: self.line(),
        })
    }

    fn objective(&self, obj: Object) -> Result<ObjectiveManifest, ManifestError> {
        let spec: ObjectiveSpec = self.spec(obj.spec, &obj.kind, &obj.metadata.name)?;
        Ok(ObjectiveManifest {
            name: obj.metadata.name,
            priority: spec.priority.unwrap_or(0),
            pool: spec.pool_ref.name,
            source: self.source.to_string(),
            line: self.line(),
        })
    }
}

/// A document's `spec` alone, as `T`: read only for its errors.
#[derive(Deserialize)]
struct Spec<T> {
    #[serde(rename = "spec")]
    _spec: T,
}

/// serde's error for document `doc` of `text` read straight into `T`, which names the field's
/// path, line and column; read through a `Value` (as documents are, to see their kind first),
/// an error has none of them. `fallback` when that read does not fail the same way.
fn located<T: DeserializeOwned>(
    text: &str,
    doc: usize,
    fallback: serde_norway::Error,
) -> serde_norway::Error {
    serde_norway::Deserializer::from_str(text)
        .nth(doc)
        .and_then(|de| T::deserialize(de).err())
        .unwrap_or(fallback)
}

/// Reads every file of `paths`, relative ones against `base`.
pub fn load(paths: &[String], base: &Path) -> Result<Manifests, ManifestError> {
    let mut all = Manifests::default();
    for p in paths {
        let path = base.join(p);
        let text = std::fs::read_to_string(&path).map_err(|source| ManifestError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let m = parse(&text, &path.display().to_string())?;
        all.pools.extend(m.pools);
        all.objectives.extend(m.objectives);
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POOLS: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: vllm}
spec: {replicas: 3}
---
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata:
  name: llama
  namespace: serving
  annotations:
    inference.networking.x-k8s.io/export: ClusterSet
spec:
  targetPorts: [{number: 8000}, {number: 8001}]
  selector: {matchLabels: {app: vllm}}
  endpointPickerRef: {name: fleetpick, port: {number: 9002}, failureMode: FailOpen}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferencePool
metadata: {name: old}
spec: {targetPortNumber: 9000, selector: {app: x}, extensionRef: {name: epp}}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: chat}
spec: {priority: 10, poolRef: {name: llama}}
"#;

    #[test]
    fn pools_and_objectives_are_read_and_other_kinds_skipped() {
        let m = parse(POOLS, "k8s.yaml").unwrap();
        assert_eq!(m.pools.len(), 2);
        let p = &m.pools[0];
        assert_eq!(
            (p.name.as_str(), p.namespace.as_deref(), &p.target_ports[..]),
            ("llama", Some("serving"), &[8000, 8001][..])
        );
        assert!(p.exported && p.fail_open);
        let old = &m.pools[1];
        assert_eq!(old.target_ports, vec![9000]);
        assert!(!old.exported && !old.fail_open);
        assert_eq!(
            m.objectives,
            vec![ObjectiveManifest {
                name: "chat".into(),
                priority: 10,
                pool: "llama".into(),
                source: "k8s.yaml".into(),
                line: Some(24),
            }]
        );
    }

    #[test]
    fn bad_manifests_name_the_document() {
        let e = parse(
            "kind: InferencePool\napiVersion: inference.networking.k8s.io/v1\nmetadata: {name: p}\nspec: {targetPorts: []}\n",
            "m.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("m.yaml, document 1") && e.contains("targetPorts"),
            "{e}"
        );
        let e = parse(
            "---\n---\nkind: InferenceObjective\napiVersion: inference.networking.x-k8s.io/v1alpha2\nmetadata: {name: o}\nspec: {priority: 1}\n",
            "m.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("document 2") && e.contains("poolRef"), "{e}");
    }

    #[test]
    fn bad_manifests_name_the_line() {
        let err = |text: &str| parse(text, "m.yaml").unwrap_err().to_string();
        const HEAD: &str = "apiVersion: inference.networking.k8s.io/v1\nkind: InferencePool\n";
        let e = err(&format!(
            "{HEAD}metadata: {{name: p}}\nspec:\n  selector: {{}}\n  targetPorts: []\n"
        ));
        assert!(
            e.starts_with(
                "manifest file m.yaml, document 1, line 6: InferencePool `p`: spec.targetPorts"
            ),
            "{e}"
        );
        // Flow style, in a later document.
        let e = err(&format!(
            "kind: Service\n---\n{HEAD}metadata: {{name: p}}\nspec: {{selector: {{}}, targetPorts: [{{number: 0}}]}}\n"
        ));
        assert!(e.contains("m.yaml, document 2, line 6: "), "{e}");
        let e = err(&format!("{HEAD}metadata:\n  namespace: x\nspec: {{}}\n"));
        assert!(
            e.contains("document 1, line 3: InferencePool without metadata.name"),
            "{e}"
        );
        // serde's own errors name the field, line and column (read through a Value, they
        // would name none of them).
        let e = err(&format!(
            "{HEAD}metadata: {{name: p}}\nspec:\n  targetPorts:\n    - number: 8000\n    - number: http\n"
        ));
        assert!(
            e.contains("InferencePool `p`: spec.targetPorts[1].number: invalid type")
                && e.contains("line 7 column 15"),
            "{e}"
        );
        let e = err(
            "kind: InferenceObjective\napiVersion: inference.networking.x-k8s.io/v1alpha2\nmetadata: {name: o}\nspec: {priority: high, poolRef: {name: p}}\n",
        );
        assert!(
            e.contains("InferenceObjective `o`: spec.priority: invalid type")
                && e.contains("line 4"),
            "{e}"
        );
        let e = err(
            "kind: InferencePool\napiVersion: inference.networking.k8s.io/v1\nmetadata: {name: [p]}\n",
        );
        assert!(
            e.contains("metadata.name: invalid type") && e.contains("line 3"),
            "{e}"
        );
        // A syntax error: serde_norway's message, with its line.
        let e = err("kind: InferencePool\nmetadata: {name: p\n");
        assert!(e.contains("document 1") && e.contains("line 3"), "{e}");
    }
}
