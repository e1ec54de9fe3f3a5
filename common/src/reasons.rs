//! The protocol's vocabulary: every `Reject.reason`, `DestinationStatus.type` and `DestinationStatus.reason` the
//! writer can send, as types. The writer can only send what is listed here, and a test checks that the proto file
//! documents every value, so the agent (and a person with grpcurl) can rely on the list in `writer.proto`.
//!
//! Beside them, the agent's own condition vocabulary ([`AgentConditionType`], [`AgentConditionReason`]): what it
//! writes on rules and destinations that the writer never sends. The two sets share no word (a test checks it),
//! so each word has one constant in both processes; where the agent says what the writer says (`Ready`,
//! `PushFailing`, `ObjectTooLarge`) it uses the writer's value.

use std::fmt;

macro_rules! vocabulary {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The CamelCase wire value.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => stringify!($variant)),+
                }
            }

            /// The value for a wire string, if it is one of ours.
            pub fn parse(text: &str) -> Option<$name> {
                Self::ALL.iter().copied().find(|v| v.as_str() == text)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

vocabulary! {
    /// Why a message was refused (`Reject.reason`). Nothing of a refused message is written.
    RejectReason {
        /// `hello` is missing a required field or has a malformed one.
        InvalidHello,
        /// The agent speaks another protocol version.
        UnsupportedProtocolVersion,
        /// The hello names a leader term older than one this writer has seen for the cluster.
        StaleLeaderTerm,
        /// A destination declaration is malformed (URL, branch, base folder, credentials, recipients).
        InvalidDestination,
        /// The destination's base folder overlaps another destination's on the same repository and branch.
        OverlappingBaseFolder,
        /// The writer runs as many workers as its limits allow.
        WorkerLimitReached,
        /// A credentials reference names no entry of the writer's credentials.
        UnknownCredentials,
        /// A snapshot marker without a valid scope.
        InvalidScope,
        /// A path that is not a portable, relative `.yaml` path inside the base folder.
        InvalidPath,
        /// Content that is not one canonical YAML object.
        InvalidYaml,
        /// A message or object above the writer's size limits.
        ObjectTooLarge,
        /// A core Secret without SOPS metadata.
        PlaintextSecret,
        /// A change for a destination this stream never declared.
        UnknownDestination,
        /// A sequence number not greater than the previous one of the destination.
        OutOfOrder,
        /// A message out of place (a second hello, data before hello, an empty message).
        ProtocolViolation,
        /// The ownership marker names another owner and exclusiveMode is on.
        MarkerConflict,
        /// A SnapshotEnd without the matching SnapshotBegin.
        SnapshotMismatch,
        /// Outside the client's grants (writer configuration file).
        Forbidden,
        /// An Upsert whose path would be a file and a folder at once; only this message is refused.
        PathConflict,
        /// Git refuses to commit the message's changes even alone (found by splitting the batch that failed to
        /// build); only this message is refused, the rest of its batch is committed.
        CommitRefused,
        /// A FlushDestination whose commit message is too long, holds a NUL, or has an empty or multi-line subject.
        InvalidFlush,
        /// The destination's worker stopped: reconnect and re-send.
        Unavailable,
        /// With omit_namespace: another namespace of the destination already has an object of this kind and name.
        NamespaceClash,
    }
}

vocabulary! {
    /// `DestinationStatus.type`: which condition of a destination a status reports.
    ConditionType {
        /// The destination's changes reach the remote (True) or cannot (False, with the reason).
        Ready,
        /// The declaration was accepted (True, reason Declared).
        Accepted,
        /// Another destination owns an overlapping base folder.
        OwnershipConflict,
        /// Another writer holds the worker's Kubernetes Lease.
        LeaseConflict,
        /// The ownership marker names another owner.
        MarkerConflict,
        /// The remote refused the credentials or the host key.
        AuthFailed,
        /// Pushes fail (unreachable remote, Git errors, a branch that keeps moving).
        PushFailing,
        /// The delete cap stops snapshot sweeps (True) or a sweep found nothing over it (False).
        SweepIncomplete,
        /// A kustomization the writer should edit cannot be read or edited in place (True), or every one it
        /// touched since was edited (False).
        KustomizationUnreadable,
    }
}

vocabulary! {
    /// `DestinationStatus.reason`: the CamelCase reason of a condition.
    ConditionReason {
        /// Ready=True: the last push succeeded.
        Pushed,
        /// Accepted=True: the destination was declared.
        Declared,
        /// OwnershipConflict=True.
        OverlappingBaseFolder,
        /// Ready=False: the writer's worker limits are reached.
        WorkerLimitReached,
        /// Ready=False: a credentials reference names nothing.
        UnknownCredentials,
        /// Ready=False: the declaration is outside the client's grants.
        Forbidden,
        /// Ready=False: the declaration is malformed.
        InvalidDestination,
        /// MarkerConflict=True.
        MarkerOwnedByOther,
        /// AuthFailed=True: authentication was refused.
        AuthenticationFailed,
        /// AuthFailed=True: the SSH host key does not match known_hosts.
        HostKeyMismatch,
        /// PushFailing=True: the remote cannot be reached.
        RemoteUnreachable,
        /// PushFailing=True: another Git error.
        GitError,
        /// PushFailing=True: the branch moved under every replay attempt.
        BranchKeepsMoving,
        /// LeaseConflict=True.
        LeaseHeldByOther,
        /// SweepIncomplete=True: orphans are left over the delete cap.
        DeleteCapReached,
        /// SweepIncomplete=False.
        SweepComplete,
        /// KustomizationUnreadable=True.
        KustomizationInvalid,
        /// KustomizationUnreadable=False.
        KustomizationUpdated,
    }
}

vocabulary! {
    /// The condition types the agent writes itself (the writer's [`ConditionType`]s are copied onto GitDestinations
    /// as they come; `Ready` is [`ConditionType::Ready`]).
    AgentConditionType {
        /// On GitDestinations: whether the stream to the writer is up.
        WriterConnected,
        /// On GitDestinations: the latest writer `Reject` for the destination.
        Rejected,
        /// On GitDestinations: objects not sent because they exceed the writer's limits (True, reason
        /// [`RejectReason::ObjectTooLarge`], naming them).
        ObjectsSkipped,
        /// On rules that select Secrets while their destination does not encrypt.
        SecretsSkipped,
        /// On GitDestinations with `spec.suspend`.
        Suspended,
    }
}

vocabulary! {
    /// The reasons of the agent's own conditions.
    AgentConditionReason {
        /// Ready=True on a rule or destination: the configuration resolved.
        Ready,
        /// Ready=False: an access policy does not admit the referencing namespace or cluster rule.
        AccessDenied,
        /// Ready=False: the destination's branch is not in the repository's `allowedBranches`.
        BranchNotAllowed,
        /// Ready=False: the rule's GitDestination does not exist.
        DestinationNotFound,
        /// Ready=False: the destination's GitRepoConfig does not exist.
        RepoNotFound,
        /// Ready=False: the destination's `baseFolder` is not a clean relative path.
        InvalidBaseFolder,
        /// Ready=False: the repository's `secretRef` Secret does not exist (or could not be read).
        CredentialsSecretNotFound,
        /// Ready=False: the repository's `secretRef` Secret lacks usable keys.
        InvalidCredentialsSecret,
        /// Ready=False: the repository has a `secretRef`, but the agent reaches the writer without TLS.
        CredentialsNeedTls,
        /// Ready=False: the rule's `ignore` names an unknown preset or holds an empty name.
        InvalidIgnore,
        /// Ready=False: the rule's `excludeNames` holds an empty or overlong pattern.
        InvalidExcludeNames,
        /// WriterConnected=True.
        Connected,
        /// WriterConnected=False.
        Disconnected,
        /// ObjectsSkipped=False: every object fits the writer's limits again.
        AllObjectsFit,
        /// SecretsSkipped=True: the destination has no `spec.encryption` (or it is not resolved yet).
        EncryptionNotConfigured,
        /// SecretsSkipped=True: the destination's fingerprint key cannot be read or made.
        FingerprintKeyUnavailable,
        /// SecretsSkipped=True: the Secret holding the age recipients cannot be read.
        RecipientsSecretUnreadable,
        /// SecretsSkipped=True: the Secret holding the age recipients does not exist.
        RecipientsSecretNotFound,
        /// SecretsSkipped=True: the age recipients are malformed.
        InvalidRecipients,
        /// Suspended=True: `spec.suspend` is set.
        Suspended,
        /// Suspended=False: `spec.suspend` was set and is no more.
        Resumed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_values_round_trip_and_are_unique() {
        for v in RejectReason::ALL {
            assert_eq!(RejectReason::parse(v.as_str()), Some(*v));
        }
        for v in ConditionType::ALL {
            assert_eq!(ConditionType::parse(v.as_str()), Some(*v));
        }
        for v in ConditionReason::ALL {
            assert_eq!(ConditionReason::parse(v.as_str()), Some(*v));
        }
        assert_eq!(RejectReason::parse("NoSuchReason"), None);
        for v in AgentConditionType::ALL {
            assert_eq!(AgentConditionType::parse(v.as_str()), Some(*v));
        }
        for v in AgentConditionReason::ALL {
            assert_eq!(AgentConditionReason::parse(v.as_str()), Some(*v));
        }
    }

    /// A word the agent and the writer both use is the writer's constant: the agent's vocabulary repeats no
    /// writer type as a type, and no writer reason (of a condition or a reject) as a reason.
    #[test]
    fn the_agents_words_are_not_the_writers() {
        let types: Vec<&str> = AgentConditionType::ALL
            .iter()
            .map(|v| v.as_str())
            .filter(|v| ConditionType::parse(v).is_some())
            .collect();
        let reasons: Vec<&str> = AgentConditionReason::ALL
            .iter()
            .map(|v| v.as_str())
            .filter(|v| ConditionReason::parse(v).is_some() || RejectReason::parse(v).is_some())
            .collect();
        assert!(
            types.is_empty() && reasons.is_empty(),
            "say these with the writer's constants: {types:?} {reasons:?}"
        );
    }

    /// Every value the writer can send is documented in the proto comments of the field that carries it.
    #[test]
    fn the_proto_documents_every_value() {
        let proto = include_str!("../../proto/reverser/v1/writer.proto");
        let comment_before = |message: &str, field: &str| -> String {
            let start = proto
                .find(&format!("message {message} {{"))
                .unwrap_or_else(|| panic!("message {message} in writer.proto"));
            let body = &proto[start..];
            let end = body.find("\n}").expect("end of message");
            let body = &body[..end];
            let field_at = body
                .find(&format!(" {field} = "))
                .unwrap_or_else(|| panic!("field {message}.{field}"));
            // The comment lines right above the field.
            body[..field_at]
                .lines()
                .rev()
                .skip(1)
                .take_while(|l| l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let reject = comment_before("Reject", "reason");
        let kinds = comment_before("DestinationStatus", "type");
        let reasons = comment_before("DestinationStatus", "reason");
        let missing: Vec<String> = RejectReason::ALL
            .iter()
            .filter(|v| !reject.contains(v.as_str()))
            .map(|v| format!("Reject.reason {v}"))
            .chain(
                ConditionType::ALL
                    .iter()
                    .filter(|v| !kinds.contains(v.as_str()))
                    .map(|v| format!("DestinationStatus.type {v}")),
            )
            .chain(
                ConditionReason::ALL
                    .iter()
                    .filter(|v| !reasons.contains(v.as_str()))
                    .map(|v| format!("DestinationStatus.reason {v}")),
            )
            .collect();
        assert!(
            missing.is_empty(),
            "undocumented in writer.proto: {missing:?}"
        );
    }
}
