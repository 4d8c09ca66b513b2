"""Developer tools that are not on the serving path: reference parity harnesses (`parity`,
`frontend_parity`) and the meta-device model inspector (`inspect`)."""
