"""Test PKI for the e2e auth suite, made with the openssl CLI (part of the base image).

make_pki(dir) -> paths of a CA, an edge server certificate for 127.0.0.1/localhost, and client
certificates whose URI SANs are SPIFFE ids; plus a second, untrusted CA's client certificate.
"""
from __future__ import annotations

import subprocess
from pathlib import Path


def _run(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(d: Path, name: str) -> tuple[Path, Path]:
    key, crt = d / f"{name}.key", d / f"{name}.crt"
    _run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(crt), "-days", "2", "-subj", f"/CN={name}",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
         cwd=d)
    return key, crt


def _leaf(d: Path, name: str, ca: tuple[Path, Path], san: str, eku: str) -> tuple[Path, Path]:
    key, csr, crt, ext = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.crt", d / f"{name}.ext"
    _run("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}", cwd=d)
    ext.write_text(f"subjectAltName={san}\nextendedKeyUsage={eku}\nbasicConstraints=CA:FALSE\n")
    _run("x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]), "-CAcreateserial",
         "-out", str(crt), "-days", "1", "-extfile", str(ext), cwd=d)
    return key, crt


def make_pki(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    ca = _ca(d, "test-ca")
    other = _ca(d, "other-ca")
    out = {"ca": ca[1]}
    out["edge_key"], out["edge_crt"] = _leaf(d, "edge", ca, "DNS:localhost,IP:127.0.0.1", "serverAuth")
    for who in ("team-a", "team-b"):
        k, c = _leaf(d, who, ca, f"URI:spiffe://test/{who}", "clientAuth")
        out[f"{who}_key"], out[f"{who}_crt"] = k, c
    out["rogue_key"], out["rogue_crt"] = _leaf(d, "rogue", other, "URI:spiffe://test/team-a", "clientAuth")
    return out
