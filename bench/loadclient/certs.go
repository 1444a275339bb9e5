package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"flag"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"time"
)

// cmdCerts writes a CA and two SPIFFE X.509-SVIDs (ECDSA P-256) into -dir:
//
//	ca.pem                      the CA (the trust bundle)
//	server.pem, server.key      the proxies' SVID (also DNS localhost, IP 127.0.0.1)
//	server-bundle.pem           server.pem + server.key in one file
//	client.pem, client.key      the agent's SVID
func cmdCerts(args []string) error {
	fs := flag.NewFlagSet("certs", flag.ExitOnError)
	dir := fs.String("dir", "", "output directory")
	td := fs.String("trust-domain", "example.org", "trust domain")
	serverID := fs.String("server-id", "spiffe://example.org/ns/egress-gateway/sa/egress-gateway", "SPIFFE ID of the proxies")
	clientID := fs.String("client-id", "spiffe://example.org/ns/ai-workloads/sa/bench-agent", "SPIFFE ID of the agent")
	fs.Parse(args)
	if *dir == "" {
		return fmt.Errorf("-dir is required")
	}
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	caURI, _ := url.Parse("spiffe://" + *td)
	caTmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "benchmark CA", Organization: []string{"egress-gateway bench"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(48 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{caURI},
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return err
	}
	leaf := func(id, cn string, dns []string, ips []net.IP) ([]byte, []byte, error) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, nil, err
		}
		u, err := url.Parse(id)
		if err != nil {
			return nil, nil, err
		}
		tmpl := &x509.Certificate{
			SerialNumber:          serial(),
			Subject:               pkix.Name{CommonName: cn},
			NotBefore:             now.Add(-time.Hour),
			NotAfter:              now.Add(24 * time.Hour),
			BasicConstraintsValid: true,
			KeyUsage:              x509.KeyUsageDigitalSignature,
			ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
			URIs:                  []*url.URL{u},
			DNSNames:              dns,
			IPAddresses:           ips,
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			return nil, nil, err
		}
		pk, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return nil, nil, err
		}
		return pemBytes("CERTIFICATE", der), pemBytes("PRIVATE KEY", pk), nil
	}
	srvCert, srvKey, err := leaf(*serverID, "localhost", []string{"localhost"}, []net.IP{net.ParseIP("127.0.0.1")})
	if err != nil {
		return err
	}
	cliCert, cliKey, err := leaf(*clientID, "bench-agent", nil, nil)
	if err != nil {
		return err
	}
	files := map[string][]byte{
		"ca.pem":            pemBytes("CERTIFICATE", caDER),
		"server.pem":        srvCert,
		"server.key":        srvKey,
		"server-bundle.pem": append(append([]byte{}, srvCert...), srvKey...),
		"client.pem":        cliCert,
		"client.key":        cliKey,
	}
	if err := os.MkdirAll(*dir, 0o700); err != nil {
		return err
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(*dir, name), b, 0o600); err != nil {
			return err
		}
	}
	return nil
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	return n.Add(n, big.NewInt(1))
}

func pemBytes(kind string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der})
}
