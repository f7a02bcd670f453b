//! The fleet file resolved: what validation makes of it (the endpoints served, each imported
//! pool's policy per cluster, the objectives).

use std::net::SocketAddr;

use crate::manifests::ObjectiveManifest;
use crate::policy::PoolPolicy;
use crate::schema::FleetFile;

/// One endpoint, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    pub addr: SocketAddr,
    pub cluster: usize,
    pub pool: usize,
}

/// A validated fleet file.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetConfig {
    pub file: FleetFile,
    /// The endpoints served: those of imported pools, in clusters that export them.
    pub endpoints: Vec<EndpointSpec>,
    /// Per pool: `None` if it is not imported, else its policy per cluster (by cluster index)
    /// and whether it is a dry run.
    pub policies: Vec<Option<PoolPolicy>>,
    /// The InferenceObjectives of the manifests and of the fleet file (their pools checked).
    pub objectives: Vec<ObjectiveManifest>,
}
