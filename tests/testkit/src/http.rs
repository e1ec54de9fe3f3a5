//! placeholder
pub struct HttpGitServer;
