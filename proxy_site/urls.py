from django.contrib import admin
from django.urls import include, path

admin.site.site_header = "MCP OAuth Proxy"
admin.site.site_title = "MCP OAuth Proxy"
admin.site.index_title = "Administration"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", include("oauthproxy.urls")),
]
