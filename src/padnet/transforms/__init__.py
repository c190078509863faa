"""Model transforms: conversion, partition, compaction (see docs/design.md)."""
