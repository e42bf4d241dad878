//! Placeholder: the fake libcuda (issue 3).
