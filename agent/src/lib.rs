//! The gitops-reverser agent (work in progress, see issue "Agent").
