//go:build debianlibs

// grpc-go and h2c roles, from Debian's golang-google-grpc-dev (grpc-go 1.33) and
// golang-golang-x-net-dev, built in GOPATH mode against /usr/share/gocode: nothing fetched.
package main

import (
	"net"
	"net/http"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

func init() {
	extraRoles["grpc"] = func(listen string) error {
		lis, err := net.Listen("tcp", listen)
		if err != nil {
			return err
		}
		s := grpc.NewServer()
		// The empty service name answers SERVING, like tonic-health's reporter.
		healthpb.RegisterHealthServer(s, health.NewServer())
		return s.Serve(lis)
	}
	extraRoles["h2c"] = func(listen string) error {
		srv := &http.Server{Addr: listen, Handler: h2c.NewHandler(http.HandlerFunc(echo), &http2.Server{})}
		return srv.ListenAndServe()
	}
}
